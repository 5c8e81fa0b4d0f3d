"""SAETrainer (sae_lens/training/trainer.py) on synthetic activations: it learns, keeps its
invariants, reports bad input, follows the LR and L1 schedules, counts dead latents (by window and by
rate), holds the allocator policy during `fit`, and trains under bf16 autocast."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens import cpu_memory
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.geometric_median import geometric_median
from sae_lens.saes import SparseAutoencoder
from sae_lens.training.lr_schedules import build_lr_lambda
from sae_lens.training.trainer import SAETrainer
from tests.conftest import make_runner_config, make_sae_config
from tests.integration.test_architectures_end_to_end import SETTINGS as AUTOCAST_SETTINGS

D_IN, D_SAE, BATCH = 16, 64, 128


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These shapes are tiny: extra threads only add synchronisation (a lot, on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def synthetic(
    n_batches: int, seed: int = 0, scale: float = 1.0, offset: float = 0.0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batches of sparse non-negative combinations of 32 random unit directions (~3 per token),
    plus a held-out batch of the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(32, D_IN, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    shift = offset * torch.randn(D_IN, generator=gen)

    def batch() -> torch.Tensor:
        active = torch.rand(BATCH, 32, generator=gen) < 3 / 32
        coefficients = torch.rand(BATCH, 32, generator=gen) + 0.5
        return scale * ((active * coefficients) @ directions + shift)

    return [batch() for _ in range(n_batches)], batch()


def make_cfg(architecture: str = "standard", n_steps: int = 80, **kw: Any) -> LanguageModelSAERunnerConfig:
    """A runner config for these tests' 16-dim synthetic data (architecture options of both kinds)."""
    defaults: dict[str, Any] = {
        "architecture": architecture,
        "hook_point": "blocks.0.hook_resid_pre",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "lr": 3e-2,
        "train_batch_size": BATCH,
        "total_training_tokens": BATCH * n_steps,
        "b_dec_init_method": "mean",
        "l1_coefficient": 0.3,
        "k": 6,
        "seed": 0,
    }
    return make_runner_config(**(defaults | kw))


def make_trainer(cfg: LanguageModelSAERunnerConfig, **kw: Any) -> SAETrainer:
    torch.manual_seed(cfg.seed)
    return SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False, **kw)


def saved_normalize_activations(folder: Path) -> str:
    """What an SAE folder's cfg.json says about its inputs' normalisation."""
    return json.loads((folder / "cfg.json").read_text())["normalize_activations"]


def ev(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return explained_variance(x, sae(x))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_fit_learns_synthetic_features(architecture: str) -> None:
    batches, held_out = synthetic(80)
    trainer = make_trainer(make_cfg(architecture))
    before = ev(trainer.sae, held_out)
    sae = trainer.fit(batches)
    after = ev(sae, held_out)
    assert sae is trainer.sae
    assert after > max(0.8, before + 0.25), (before, after)  # real learning, whatever the init gives
    assert after > 0.8, (before, after)
    assert trainer.n_steps == 80 and trainer.n_tokens == 80 * BATCH
    assert not trainer.ran_out_of_data
    if architecture == "topk":
        # Trained at unit norm, then the closing least-squares refit moves the rows.
        assert trainer.refit_report["objective_after"] < trainer.refit_report["objective_before"]
    else:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=0, atol=1e-5)
    with torch.no_grad():
        l0 = (sae.encode(held_out) > 0).sum(dim=-1).float().mean().item()
    if architecture == "topk":
        assert l0 <= 6
    else:
        assert 0 < l0 < D_SAE / 2  # the L1 penalty keeps it sparse


def test_fit_stops_at_total_tokens_or_when_data_runs_out() -> None:
    batches, _ = synthetic(6)
    trainer = make_trainer(make_cfg(n_steps=4))
    trainer.fit(batches)
    assert trainer.n_steps == 4 and not trainer.ran_out_of_data
    short = make_trainer(make_cfg(n_steps=10))
    short.fit(iter(batches))
    assert short.n_steps == 6 and short.ran_out_of_data


def test_normalize_activations_is_folded_into_saved_sae(tmp_path: Path) -> None:
    batches, held_out = synthetic(80, seed=1, scale=50.0)
    scales: list[float] = []

    def evaluator(sae: SparseAutoencoder, input_scale: float) -> dict[str, Any]:
        scales.append(input_scale)
        return {}

    cfg = make_cfg("topk", normalize_activations="expected_average_only_in", n_checkpoints=1)
    trainer = make_trainer(cfg, evaluator=evaluator, checkpoint_dir=tmp_path / "ckpt")
    sae = trainer.fit(batches)

    expected_scale = D_IN**0.5 / batches[0].norm(dim=-1).mean().item()
    assert scales[-1] == pytest.approx(expected_scale, rel=1e-5)  # the final eval, before folding
    assert trainer.input_scale == 1.0
    # The input scale is training state (folded in when training ends), not an SAE config field.
    assert trainer.state.input_scale == 1.0 and not hasattr(sae.cfg, "normalize_activations")
    assert ev(sae, held_out) > 0.8

    loaded = SparseAutoencoder.load_from_disk(sae.save_model(tmp_path / "final"))
    assert saved_normalize_activations(tmp_path / "final") == "none"
    assert ev(loaded, held_out) > 0.8
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out), sae(held_out))

    # The mid-run checkpoint was folded too, and training went on at its own scale.
    # (A checkpoint folder holds the SAE's folder beside the training state.)
    (sae_folder,) = [cfg_file.parent for cfg_file in (tmp_path / "ckpt" / "step_40").rglob("cfg.json")]
    checkpoint = SparseAutoencoder.load_from_disk(sae_folder)
    assert saved_normalize_activations(sae_folder) == "none"
    assert ev(checkpoint, held_out) > 0.5


@pytest.mark.parametrize("method", ["mean", "geometric_median", "zeros"])
def test_b_dec_initialisation_from_first_batch(method: str) -> None:
    batches, _ = synthetic(3, seed=2, offset=2.0)
    first = batches[0]
    expected = {
        "mean": first.mean(dim=0),
        "geometric_median": geometric_median(first),
        "zeros": torch.zeros(D_IN),
    }[method]
    assert method == "zeros" or expected.norm() > 1.0

    # Directly, before any step.
    trainer = make_trainer(make_cfg(b_dec_init_method=method))
    trainer._initialise_from(first)
    torch.testing.assert_close(trainer.sae.b_dec.detach(), expected)

    # Through fit, with a learning rate too small to move it visibly in one step.
    trainer = make_trainer(make_cfg(b_dec_init_method=method, lr=1e-9, n_steps=1))
    trainer.fit(batches)
    assert trainer.n_steps == 1
    torch.testing.assert_close(trainer.sae.b_dec.detach(), expected, rtol=0, atol=1e-6)


def test_geometric_median_init_is_in_raw_units_after_folding() -> None:
    batches, _ = synthetic(2, seed=3, scale=20.0, offset=2.0)
    cfg = make_cfg(
        b_dec_init_method="geometric_median",
        lr=1e-9,
        n_steps=1,
        normalize_activations="expected_average_only_in",
    )
    trainer = make_trainer(cfg)
    trainer.fit(batches)
    # Trained on s*x with b_dec = gm(s*x) = s*gm(x); folding divides by s.
    torch.testing.assert_close(trainer.sae.b_dec.detach(), geometric_median(batches[0]), rtol=1e-4, atol=1e-4)


def test_latent_that_never_fires_is_counted_dead() -> None:
    batches, _ = synthetic(20, seed=4)
    trainer = make_trainer(make_cfg(n_steps=20, dead_feature_window=5))
    sae = trainer.sae
    with torch.no_grad():
        sae.b_enc[5] = -1e3
    w_enc_5 = sae.W_enc[:, 5].detach().clone()
    trainer.fit(batches)
    assert trainer.steps_since_fired[5] == 20
    assert trainer.fire_counts[5] == 0
    assert trainer.log10_feature_density()[5].item() == pytest.approx(-10.0)
    # The latents that do fire have smaller counters and positive counts.
    fired = trainer.fire_counts > 0
    assert fired.sum() >= D_SAE // 2
    assert (trainer.steps_since_fired[fired] < 20).all()
    assert (trainer.steps_since_fired[~fired] == 20).all()
    # Without ghost grads nothing moves a dead latent's encoder.
    assert torch.equal(sae.W_enc[:, 5].detach(), w_enc_5)
    assert sae.b_enc[5].item() == -1e3


def test_ghost_grads_move_a_dead_latent() -> None:
    batches, _ = synthetic(20, seed=4)
    trainer = make_trainer(make_cfg(n_steps=20, dead_feature_window=5, use_ghost_grads=True))
    sae = trainer.sae
    with torch.no_grad():
        sae.b_enc[5] = -30.0
    w_enc_5 = sae.W_enc[:, 5].detach().clone()
    trainer.fit(batches)
    assert trainer.steps_since_fired[5] == 20  # still far below zero
    # Dead for more than 5 steps -> ghost grads gave it gradient.
    assert not torch.equal(sae.W_enc[:, 5].detach(), w_enc_5)
    assert sae.b_enc[5].item() != -30.0


def test_fit_on_empty_iterable_raises() -> None:
    trainer = make_trainer(make_cfg())
    with pytest.raises(SAELensError, match="no activations"):
        trainer.fit([])
    with pytest.raises(SAELensError):
        trainer.fit(iter(()))


@pytest.mark.parametrize("shape", [(BATCH, D_IN - 1), (BATCH, D_IN + 3), (D_IN,), (2, BATCH, D_IN)])
def test_wrong_batch_shape_raises(shape: tuple[int, ...]) -> None:
    trainer = make_trainer(make_cfg())
    with pytest.raises(SAELensError, match=f"d_in={D_IN}"):
        trainer.fit([torch.randn(*shape)])
    assert trainer.n_steps == 0


def test_seed_era_attributes_are_read_only_views_of_the_state() -> None:
    batches, _ = synthetic(3)
    trainer = make_trainer(make_cfg(n_steps=3))
    trainer.fit(batches)
    state = trainer.state
    assert (trainer.n_steps, trainer.n_tokens, trainer.input_scale) == (state.n_steps, state.n_tokens, 1.0)
    assert trainer.optimizer is state.optimizer and trainer.scheduler is state.scheduler
    assert trainer.steps_since_fired is state.steps_since_fired and trainer.fire_counts is state.fire_counts
    with pytest.raises(AttributeError):
        trainer.n_steps = 0  # type: ignore[misc]


# -- learning-rate and L1 schedules -------------------------------------------------------------------


def schedule_cfg(**kw: Any) -> LanguageModelSAERunnerConfig:
    # 10 steps of 10 tokens.
    return make_runner_config(total_training_tokens=100, train_batch_size=10, lr=1e-3, **kw)


def test_schedule_drives_the_optimizer_lr() -> None:
    cfg = schedule_cfg(lr_scheduler_name="cosineannealing", lr_end=1e-4, lr_warm_up_steps=2)
    sae = SparseAutoencoder(make_sae_config("standard", 2, 4))
    trainer = SAETrainer(cfg, sae, show_progress=False)
    f = build_lr_lambda(cfg)
    for step in range(4):
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * f(step))
        trainer.train_step(torch.randn(10, 2))


def test_current_l1_coefficient_warm_up() -> None:
    # The coefficient is the SAE's own (sae.cfg.l1_coefficient); the SAE is built from this config.
    cfg = schedule_cfg(architecture="standard", l1_coefficient=2.0, l1_warm_up_steps=4, d_in=2, d_sae=4)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    seen = []
    for _ in range(6):
        seen.append(trainer.current_l1_coefficient())
        metrics = trainer.train_step(torch.randn(10, 2))
        # The metric is reported after the step, i.e. for the next step's coefficient.
        assert metrics["l1_coefficient"] == trainer.current_l1_coefficient()
    assert seen == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    no_warm_up_cfg = schedule_cfg(architecture="standard", l1_coefficient=2.0, d_in=2, d_sae=4)
    no_warm_up = SAETrainer(no_warm_up_cfg, SparseAutoencoder(no_warm_up_cfg), show_progress=False)
    assert no_warm_up.current_l1_coefficient() == 2.0


def test_l1_coefficient_comes_from_the_sae_config() -> None:
    cfg = schedule_cfg(architecture="standard", l1_coefficient=2.0, l1_warm_up_steps=2)
    sae = SparseAutoencoder(make_sae_config("standard", 2, 4, l1_coefficient=0.5))
    trainer = SAETrainer(cfg, sae, show_progress=False)
    assert trainer.current_l1_coefficient() == pytest.approx(0.25)  # 0.5, warmed up over 2 steps


def test_no_l1_coefficient_for_architectures_without_a_penalty() -> None:
    cfg = schedule_cfg(architecture="topk", k=2, l1_coefficient=2.0, d_in=2, d_sae=4)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    assert trainer.current_l1_coefficient() is None
    metrics = trainer.train_step(torch.randn(10, 2))
    assert metrics["l1_coefficient"] == 0.0 and metrics["l1_loss"] == 0.0
    assert [name for name in metrics if name.startswith("losses/")] == ["losses/mse"]


# -- dead latents by firing rate ----------------------------------------------------------------------

RATE_BATCH = 100


def rate_batch(fires: list[int]) -> torch.Tensor:
    """`[100, 4]` inputs on which latent i of `rate_sae` fires on exactly `fires[i]` tokens."""
    x = -torch.ones(RATE_BATCH, 4)
    for latent, n in enumerate(fires):
        x[:n, latent] = 1.0
    return x


def rate_trainer(n_steps: int, **kw: Any) -> SAETrainer:
    """A standard SAE with W_enc = W_dec = I and zero biases, so latent i fires exactly where
    x_i > 0; the learning rate is too small to change that."""
    cfg = make_runner_config(
        architecture="standard",
        d_in=4,
        d_sae=4,
        lr=1e-9,
        train_batch_size=RATE_BATCH,
        total_training_tokens=RATE_BATCH * n_steps,
        b_dec_init_method="zeros",
        feature_sampling_window=2,
        dead_feature_window=1000,
        **kw,
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
    return SAETrainer(cfg, sae, show_progress=False)


# Per token rates: latent 0 at 0.02, latent 1 at 0.5, latent 2 always, latent 3 never.
RATES = [2, 50, 100, 0]


def test_latent_below_the_rate_threshold_over_a_completed_window_is_dead() -> None:
    trainer = rate_trainer(2, dead_feature_threshold=0.1)
    trainer.fit([rate_batch(RATES)] * 2)
    assert trainer.n_steps == 2
    assert trainer.fire_counts.tolist() == [4.0, 100.0, 200.0, 0.0]
    assert trainer.dead_latents().tolist() == [True, False, False, True]
    # None of them is dead by the window rule (1000 steps without firing).
    assert not (trainer.steps_since_fired > trainer.cfg.dead_window_steps).any()


def test_rate_rule_waits_for_a_completed_window() -> None:
    trainer = rate_trainer(1, dead_feature_threshold=0.1)
    trainer.fit([rate_batch(RATES)])
    assert trainer.n_steps == 1
    assert trainer.dead_latents().tolist() == [False, False, False, False]


def test_rate_rule_uses_the_last_completed_window() -> None:
    # Window 1 (steps 1-2): latent 0 fires on 60% of tokens; window 2 (steps 3-4): on 2%.
    batches = [rate_batch([60, 50, 100, 100])] * 2 + [rate_batch([2, 50, 100, 100])] * 2
    three = rate_trainer(4, dead_feature_threshold=0.1)
    three.fit(batches[:3])
    assert three.n_steps == 3 and three.dead_latents().tolist() == [False, False, False, False]
    four = rate_trainer(4, dead_feature_threshold=0.1)
    four.fit(batches)
    assert four.dead_latents().tolist() == [True, False, False, False]


def test_default_threshold_of_zero_changes_nothing() -> None:
    trainer = rate_trainer(2)
    assert trainer.cfg.dead_feature_threshold == 0.0
    trainer.fit([rate_batch(RATES)] * 2)
    # Latent 3 never fired, but only the window rule (1000 steps) counts by default.
    assert trainer.dead_latents().tolist() == [False, False, False, False]
    assert torch.equal(trainer.dead_latents(), trainer.steps_since_fired > trainer.cfg.dead_window_steps)


# -- the allocator policy -----------------------------------------------------------------------------

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt tuning exists only with glibc",
)


@pytest.fixture
def glibc_defaults() -> Iterator[None]:
    """Start and end with glibc's defaults, whatever an earlier test left."""
    cpu_memory.restore_default_allocator()
    yield
    cpu_memory.restore_default_allocator()


def allocator_cfg(n_steps: int, architecture: str = "topk", **kw: Any) -> LanguageModelSAERunnerConfig:
    return make_runner_config(
        architecture=architecture,
        hook_point="blocks.0.hook_resid_pre",
        d_in=8,
        d_sae=32,
        k=4,
        train_batch_size=64,
        total_training_tokens=64 * n_steps,
        **kw,
    )


def batches_recording_the_allocator(n: int, seen: list[bool]) -> Iterator[torch.Tensor]:
    """`n` random `[64, 8]` batches; records whether freed memory is kept as each one is drawn."""
    for _ in range(n):
        seen.append(cpu_memory.is_reusing_freed_memory())
        yield torch.randn(64, 8)


@glibc_only
def test_fit_holds_the_allocator_policy_and_restores_the_defaults(glibc_defaults: None) -> None:
    cfg = allocator_cfg(n_steps=3)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    # Constructing a trainer no longer changes the process-wide setting; fit holds it.
    assert not cpu_memory.is_reusing_freed_memory()
    seen: list[bool] = []
    trainer.fit(batches_recording_the_allocator(3, seen))
    assert seen == [True, True, True]
    assert not cpu_memory.is_reusing_freed_memory()
    assert trainer.n_steps == 3


@glibc_only
@pytest.mark.parametrize(
    ("architecture", "setting", "expected"),
    [
        ("topk", False, False),
        ("batchtopk", None, True),
        ("standard", None, True),
        # Many dense [batch, d_sae] temporaries fragment a heap that keeps freed memory: off unless asked.
        ("gated", None, False),
        ("jumprelu", None, False),
        ("jumprelu", True, True),
    ],
)
def test_default_follows_the_architecture_and_config_overrides_it(
    architecture: str, setting: bool | None, expected: bool, glibc_defaults: None
) -> None:
    cfg = allocator_cfg(n_steps=2, architecture=architecture, cpu_reuse_freed_memory=setting)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    seen: list[bool] = []
    trainer.fit(batches_recording_the_allocator(2, seen))
    assert seen == [expected, expected]
    assert not cpu_memory.is_reusing_freed_memory()
    # The same policy around direct train_step calls.
    with trainer.allocator_policy() as active:
        assert active is expected
        assert cpu_memory.is_reusing_freed_memory() is expected
        trainer.train_step(torch.randn(64, 8))
    assert not cpu_memory.is_reusing_freed_memory()


# -- bf16 autocast --------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(AUTOCAST_SETTINGS))
def test_autocast_step_matches_float32(architecture: str) -> None:
    """One bf16-autocast step lands close to the float32 step, and parameters keep their dtype."""
    torch.manual_seed(0)
    if architecture == "matryoshka_batchtopk":
        # (Its end-to-end widths end at 1536; a config checks them against d_sae when it is built.)
        cfg = make_runner_config(
            d_in=32, d_sae=128, architecture=architecture, k=4, matryoshka_widths=[16, 64, 128]
        )
    else:
        cfg = make_runner_config(
            d_in=32,
            expansion_factor=4,
            architecture=architecture,
            **{**AUTOCAST_SETTINGS[architecture], "k": 4},
        )
    reference = SparseAutoencoder.from_config(cfg.sae_config(32))
    x = torch.randn(256, 32)
    losses = {}
    for autocast in (False, True):
        cfg.autocast = autocast
        sae = SparseAutoencoder.from_config(cfg.sae_config(32))
        sae.load_state_dict(reference.state_dict())
        trainer = SAETrainer(cfg, sae, show_progress=False)
        metrics = trainer.train_step(x)
        losses[autocast] = metrics["loss"]
        # Autocast changes the compute dtype only (JumpReLU keeps its log-threshold in float64).
        assert [p.dtype for p in sae.parameters()] == [p.dtype for p in reference.parameters()]
        assert all(torch.isfinite(p).all() for p in sae.parameters())
    # bf16 keeps 8 bits of mantissa: a relative error of a few percent at most on the loss.
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


@pytest.mark.parametrize(("max_grad_norm", "expect_clipped"), [(1e-3, True), (None, False)])
def test_gradients_are_clipped_to_max_grad_norm_before_the_optimiser_step(
    max_grad_norm: float | None, expect_clipped: bool
) -> None:
    trainer = make_trainer(make_cfg("topk", max_grad_norm=max_grad_norm))
    batches, _ = synthetic(3)
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    trainer.begin(batches[0])
    trainer.state.optimizer.register_step_pre_hook(record)
    for batch in batches:
        trainer.train_step(batch)
    assert len(norms) == 3
    if expect_clipped:
        assert norms == pytest.approx([1e-3] * 3, rel=1e-4)
    else:
        assert min(norms) > 1e-2  # the raw gradients of these batches are far larger


def test_auto_lr_is_resolved_for_the_sae_width() -> None:
    from sae_lens.training.config import auto_lr

    trainer = make_trainer(make_cfg("topk", lr="auto"))
    assert trainer.state.lr == auto_lr(D_SAE, BATCH)
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(auto_lr(D_SAE, BATCH))
