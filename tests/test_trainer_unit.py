"""SAETrainer on synthetic activations: it learns, keeps its invariants, and reports bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.geometric_median import geometric_median
from sae_lens.saes import SparseAutoencoder
from sae_lens.training.trainer import SAETrainer

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
    return LanguageModelSAERunnerConfig(**(defaults | kw))


def make_trainer(cfg: LanguageModelSAERunnerConfig, **kw: Any) -> SAETrainer:
    torch.manual_seed(cfg.seed)
    return SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False, **kw)


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
    assert before < 0.3
    assert after > 0.8, (before, after)
    assert trainer.n_steps == 80 and trainer.n_tokens == 80 * BATCH
    assert not trainer.ran_out_of_data
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
    assert sae.cfg.normalize_activations == "none"
    assert ev(sae, held_out) > 0.8

    loaded = SparseAutoencoder.load_from_disk(sae.save_model(tmp_path / "final"))
    assert loaded.cfg.normalize_activations == "none"
    assert ev(loaded, held_out) > 0.8
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out), sae(held_out))

    # The mid-run checkpoint was folded too, and training went on at its own scale.
    checkpoint = SparseAutoencoder.load_from_disk(tmp_path / "ckpt" / "step_40")
    assert checkpoint.cfg.normalize_activations == "none"
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
