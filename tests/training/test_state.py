"""TrainingState (sae_lens/training/state.py): saving `state_dict()` part way through a run and
loading it into a fresh SAE and trainer built from the same config continues training exactly: the
weights after the remaining steps are bitwise those of an uninterrupted run (CPU, one thread)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import SparseAutoencoder
from sae_lens.training import SAETrainer, TrainingState
from sae_lens.training.lr_schedules import build_lr_lambda
from tests.conftest import make_runner_config

N_STEPS, SPLIT, BATCH, D_IN, D_SAE = 12, 8, 64, 16, 64

# Options that make every stateful part matter: losses on dead latents (AuxK, ghost grads), the
# BatchTopK threshold EMA, JumpReLU's thresholds, and an L1 warm-up.
OPTIONS: dict[str, dict[str, Any]] = {
    "topk": {"k": 4, "aux_k": 8},
    "batchtopk": {"k": 4, "topk_threshold_lr": 0.2},
    "standard": {"l1_coefficient": 0.05, "use_ghost_grads": True},
    "jumprelu": {"l1_coefficient": 0.01, "jumprelu_init_threshold": 0.05, "jumprelu_bandwidth": 0.1},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Bitwise comparisons need the same reduction order in both runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_cfg(architecture: str) -> Any:
    return make_runner_config(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        lr=3e-3,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=2,
        l1_warm_up_steps=4,
        train_batch_size=BATCH,
        total_training_tokens=BATCH * N_STEPS,
        b_dec_init_method="mean",
        dead_feature_window=2,
        feature_sampling_window=4,
        dead_feature_threshold=0.02,
        wandb_log_frequency=3,
        decoder_refit_tokens=N_STEPS * BATCH,  # capped at half the run: steps 6-11, around the split
        **OPTIONS[architecture],
    )


def seeded_batches() -> list[torch.Tensor]:
    """N_STEPS batches of sparse non-negative combinations of 32 random directions."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(32, D_IN, generator=gen)
    out = []
    for _ in range(N_STEPS):
        active = torch.rand(BATCH, 32, generator=gen) < 3 / 32
        out.append((active * (torch.rand(BATCH, 32, generator=gen) + 0.5)) @ directions)
    return out


def fresh_trainer(architecture: str, seed: int) -> SAETrainer:
    cfg = make_cfg(architecture)
    torch.manual_seed(seed)
    return SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)


def training_tensors(trainer: SAETrainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in its training form (JumpReLU's float64 log_threshold included)."""
    sae = trainer.sae
    return {**dict(sae.named_parameters()), **dict(sae.named_buffers()), **sae.state_dict()}


@pytest.mark.parametrize("architecture", sorted(OPTIONS))
def test_resumed_training_is_bitwise_the_uninterrupted_run(architecture: str) -> None:
    batches = seeded_batches()
    uninterrupted = fresh_trainer(architecture, seed=0)
    uninterrupted.fit(batches)
    assert uninterrupted.n_steps == N_STEPS

    first = fresh_trainer(architecture, seed=0)
    first.begin(batches[0])  # steps without `end`, as when a checkpoint is written mid-run
    for batch in batches[:SPLIT]:
        first.step(batch)
    assert first.n_steps == SPLIT
    assert bool(first.state.refit_inputs) == first.sae.supports_decoder_refit
    # Through bytes, as a checkpoint file would carry it, read back the safe way.
    buffer = io.BytesIO()
    torch.save(first.state.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = fresh_trainer(architecture, seed=1234)  # other initial weights: the state must replace them
    resumed.state.load_state_dict(state)
    assert resumed.n_steps == SPLIT and resumed.n_tokens == SPLIT * BATCH
    resumed.fit(batches[SPLIT:])
    assert resumed.n_steps == N_STEPS and not resumed.ran_out_of_data

    want, got = training_tensors(uninterrupted), training_tensors(resumed)
    assert set(got) == set(want)
    different = [name for name in want if not torch.equal(got[name].detach(), want[name].detach())]
    assert not different, f"{architecture}: resumed training differs in {different}"
    for name in ("steps_since_fired", "fire_counts", "window_fire_counts", "below_threshold"):
        assert torch.equal(getattr(resumed.state, name), getattr(uninterrupted.state, name)), name
    assert (
        resumed.state.optimizer.param_groups[0]["lr"] == uninterrupted.state.optimizer.param_groups[0]["lr"]
    )
    if architecture == "batchtopk":
        assert bool((resumed.sae.threshold > 0).all())  # the EMA was set and carried over
    # Both refitted their decoders from the same equations (the resumed run's began in `first`).
    timeless = [{k: v for k, v in t.refit_report.items() if k != "seconds"} for t in (resumed, uninterrupted)]
    assert timeless[0] == timeless[1]
    assert bool(resumed.refit_report) == resumed.sae.supports_decoder_refit


def test_state_dict_holds_everything_and_copies_tensors() -> None:
    trainer = fresh_trainer("topk", seed=0)
    trainer.fit(seeded_batches()[:2])
    state = trainer.state.state_dict()
    assert {"sae", "optimizer", "scheduler", "n_steps", "n_tokens", "input_scale", "fire_counts"} <= set(
        state
    )
    assert state["n_steps"] == 2 and state["initialised"] is True
    state["sae"]["W_enc"].zero_()
    state["fire_counts"].zero_()
    assert trainer.sae.W_enc.abs().sum() > 0 and trainer.state.fire_counts.sum() > 0


def test_numbers_are_restored_with_their_types() -> None:
    trainer = fresh_trainer("topk", seed=0)
    trainer.state.input_scale = 2.5
    trainer.state.n_tokens = 640
    other = fresh_trainer("topk", seed=1)
    other.state.load_state_dict(trainer.state.state_dict())
    assert other.state.input_scale == 2.5 and isinstance(other.state.input_scale, float)
    assert other.state.n_tokens == 640 and isinstance(other.state.n_tokens, int)
    assert other.input_scale == 2.5


def test_an_incomplete_state_is_refused_by_name() -> None:
    state = fresh_trainer("topk", seed=0).state.state_dict()
    del state["optimizer"], state["fire_counts"]
    target = TrainingState(make_cfg("topk"), SparseAutoencoder(make_cfg("topk")))
    with pytest.raises(SAELensError, match="fire_counts, optimizer"):
        target.load_state_dict(state)


def group_lrs(state: TrainingState) -> dict[str, float]:
    """Each parameter's current learning rate, by name."""
    names = {id(param): name for name, param in state.sae.named_parameters()}
    return {names[id(p)]: group["lr"] for group in state.optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize(("architecture", "scale"), [("topk", 6.0), ("batchtopk", 6.0), ("standard", 1.0)])
def test_the_decoder_trains_at_its_architectures_lr_multiple(architecture: str, scale: float) -> None:
    cfg = make_runner_config(architecture=architecture, d_in=D_IN, d_sae=D_SAE, lr=2e-3)
    state = TrainingState(cfg, SparseAutoencoder(cfg))
    lrs = group_lrs(state)
    assert lrs.pop("W_dec") == pytest.approx(2e-3 * scale)
    assert set(lrs.values()) == {2e-3} and {"W_enc", "b_enc", "b_dec"} <= set(lrs)
    assert state.scheduler.get_last_lr()[0] == 2e-3  # what the logs report: the base lr


def test_decoder_lr_scale_overrides_the_default_and_follows_the_schedule() -> None:
    cfg = make_runner_config(
        architecture="topk", d_in=D_IN, d_sae=D_SAE, k=4, lr=1e-3, decoder_lr_scale=3.0,
        train_batch_size=BATCH, total_training_tokens=BATCH * 10, lr_decay_steps=5,
    )  # fmt: skip
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    assert group_lrs(trainer.state)["W_dec"] == pytest.approx(3e-3)
    trainer.fit(seeded_batches()[:8])  # into the 5-step decay to 0
    lrs = group_lrs(trainer.state)
    assert lrs["W_enc"] == pytest.approx(1e-3 * build_lr_lambda(cfg, 1e-3)(8)) and lrs["W_enc"] < 1e-3
    assert lrs["W_dec"] == pytest.approx(3 * lrs["W_enc"])


def test_decoder_lr_scale_must_be_positive() -> None:
    with pytest.raises(SAELensError, match="decoder_lr_scale"):
        make_runner_config(architecture="topk", decoder_lr_scale=0)
