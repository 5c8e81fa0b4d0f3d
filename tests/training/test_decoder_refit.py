"""The decoder's closing least-squares fit (sae_lens/training/decoder_refit.py): the normal
equations against dense sums, the ridge solution against a direct solve, and the trainer's use of
it (same codes, lower error, only where it applies)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from sae_lens.saes import SparseAutoencoder
from sae_lens.training import SAETrainer
from sae_lens.training.decoder_refit import DecoderRefit
from tests.conftest import make_runner_config

D_IN, D_SAE, BATCH, STEPS = 16, 64, 128, 20


def random_codes(n: int, d_sae: int, seed: int) -> torch.Tensor:
    """`[n, d_sae]` non-negative codes with a different number of active latents per row (0 to 6)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, d_sae, dtype=torch.float64)
    for row in range(n):
        active = torch.randperm(d_sae, generator=gen)[: int(torch.randint(0, 7, (1,), generator=gen))]
        codes[row, active] = torch.rand(active.numel(), generator=gen, dtype=torch.float64) + 0.1
    return codes


def test_the_equations_are_the_dense_sums_over_every_batch() -> None:
    refit = DecoderRefit(D_SAE, 5, "cpu")
    dense = []
    targets = []
    for seed in range(3):
        codes = random_codes(40, D_SAE, seed)
        target = torch.randn(40, 5, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
        refit.add(codes.to_sparse_coo() if seed != 1 else codes, target)  # sparse and dense both
        dense.append(torch.cat([codes, torch.ones(40, 1, dtype=torch.float64)], dim=1))
        targets.append(target)
    z, y = torch.cat(dense), torch.cat(targets)
    # Each batch's products are taken in float32 (the codes' precision), the sums in float64.
    torch.testing.assert_close(refit.gram, z.T @ z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(refit.cross, z.T @ y, rtol=1e-6, atol=1e-6)
    assert torch.equal(refit.gram, refit.gram.T) and not refit.upper.tril(-1).any()
    assert float(refit.target_square) == pytest.approx(float(y.pow(2).sum()), rel=1e-6)
    assert float(refit.gram[-1, -1]) == 120  # the bias "latent" counts the tokens


def test_the_solution_is_the_ridge_fit_towards_the_trained_weights() -> None:
    refit = DecoderRefit(D_SAE, 5, "cpu")
    codes = random_codes(300, D_SAE, 0)
    gen = torch.Generator().manual_seed(1)
    true_w, true_b = torch.randn(D_SAE, 5, generator=gen), torch.randn(5, generator=gen)
    y = codes.float() @ true_w + true_b + 0.01 * torch.randn(300, 5, generator=gen)
    refit.add(codes, y)
    trained_w, trained_b = torch.zeros(D_SAE, 5), torch.zeros(5)
    solved = refit.solve(trained_w, trained_b, ridge=0.5)
    assert solved is not None
    weights, before, after = solved
    # By hand: (G + λI) W = C + λ W_trained, λ = ridge x the mean squared code of a latent.
    z = torch.cat([codes, torch.ones(300, 1, dtype=torch.float64)], dim=1)
    lam = 0.5 * (z[:, :D_SAE] ** 2).sum(0).mean()
    want = torch.linalg.solve(z.T @ z + lam * torch.eye(D_SAE + 1, dtype=torch.float64), z.T @ y.double())
    torch.testing.assert_close(weights.double(), want, rtol=1e-5, atol=1e-5)
    assert before == pytest.approx(float(y.double().pow(2).sum()))
    assert after == pytest.approx(float((y.double() - z @ weights.double()).pow(2).sum()), rel=1e-6)
    # With almost no ridge the noiseless part is recovered.
    exact = refit.solve(trained_w, trained_b, ridge=1e-9)
    assert exact is not None
    torch.testing.assert_close(
        exact[0][:D_SAE][codes.abs().sum(0) > 0], true_w[codes.abs().sum(0) > 0], atol=0.02, rtol=0
    )
    torch.testing.assert_close(exact[0][D_SAE], true_b, atol=0.02, rtol=0)


def test_nothing_accumulated_or_a_singular_system_keeps_the_trained_weights() -> None:
    assert DecoderRefit(D_SAE, 5, "cpu").solve(torch.zeros(D_SAE, 5), torch.zeros(5)) is None
    refit = DecoderRefit(D_SAE, 5, "cpu")
    codes = random_codes(100, D_SAE, 0)
    codes[:, :3] = 0  # three latents never fire: without a ridge their rows are undetermined
    refit.add(codes, torch.randn(100, 5, dtype=torch.float64))
    assert refit.solve(torch.zeros(D_SAE, 5), torch.zeros(5), ridge=0.0) is None
    assert refit.solve(torch.zeros(D_SAE, 5), torch.zeros(5), ridge=0.1) is not None


def sparse_batches(n_batches: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(48, D_IN, generator=gen)
    out = []
    for _ in range(n_batches):
        active = torch.rand(BATCH, 48, generator=gen) < 4 / 48
        out.append((active * (torch.rand(BATCH, 48, generator=gen) + 0.5)) @ directions + 0.3)
    return out


def train(architecture: str, **options: object) -> SAETrainer:
    cfg = make_runner_config(
        architecture=architecture, d_in=D_IN, d_sae=D_SAE, lr=3e-3, train_batch_size=BATCH,
        total_training_tokens=BATCH * STEPS, **({"k": 4} if "topk" in architecture else {}), **options,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    trainer.fit(sparse_batches(STEPS))
    return trainer


def squared_error(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae.decode(sae.encode(x)) - x).pow(2).sum())


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_training_ends_with_the_refit_same_codes_lower_error(architecture: str) -> None:
    plain = train(architecture, decoder_refit_tokens=0)
    refit = train(architecture, decoder_refit_tokens=10 * BATCH)
    assert plain.refit_report == {}
    report = refit.refit_report
    assert report["tokens"] == 10 * BATCH and report["objective_after"] < report["objective_before"]
    # The encoder is what training made it; the pre-activations are the same to rounding (b_enc
    # absorbed the change of b_dec), so the same latents fire.
    torch.testing.assert_close(refit.sae.W_enc, plain.sae.W_enc, rtol=0, atol=0)
    assert not torch.allclose(refit.sae.W_dec, plain.sae.W_dec)
    x = torch.cat(sparse_batches(STEPS)[-10:])
    with torch.no_grad():
        torch.testing.assert_close(refit.sae.encode(x) != 0, plain.sae.encode(x) != 0, rtol=0, atol=0)
    assert squared_error(refit.sae, x) < 0.98 * squared_error(plain.sae, x)
    # The objective before is the trained SAE's error on the fitted batches (the trained encoder's
    # codes, the trained decoder), the one after the refitted SAE's.
    fitted = torch.cat(sparse_batches(STEPS)[-10:])
    assert report["objective_before"] == pytest.approx(squared_error(plain.sae, fitted), rel=1e-4)
    assert report["objective_after"] == pytest.approx(squared_error(refit.sae, fitted), rel=1e-4)
    assert refit.state.refit_inputs == []  # the kept batches are freed


def counting_evaluator(explained_variances: list[float]) -> Any:
    """An evaluator that reports the given explained variances in turn (the trainer's decision is
    what is under test here, not the metric)."""
    calls = iter(explained_variances)

    def evaluate(sae: SparseAutoencoder, scale: float) -> dict[str, Any]:
        return {"eval/explained_variance": next(calls)}

    return evaluate


@pytest.mark.parametrize(("after", "kept"), [(0.9, True), (0.7, False)])
def test_with_an_evaluator_a_refit_that_lowers_held_out_ev_is_undone(after: float, kept: bool) -> None:
    plain = train("topk", decoder_refit_tokens=0)
    cfg = make_runner_config(
        architecture="topk", d_in=D_IN, d_sae=D_SAE, lr=3e-3, train_batch_size=BATCH, k=4,
        total_training_tokens=BATCH * STEPS, decoder_refit_tokens=10 * BATCH,
    )  # fmt: skip
    torch.manual_seed(0)
    # Evaluated every 100 logs: only the two final evaluations, before and after the refit.
    trainer = SAETrainer(
        cfg, SparseAutoencoder(cfg), show_progress=False, evaluator=counting_evaluator([0.8, after])
    )
    trainer.fit(sparse_batches(STEPS))
    assert trainer.last_eval["eval/explained_variance"] == (0.9 if kept else 0.8)
    same = all(
        torch.equal(getattr(trainer.sae, n), getattr(plain.sae, n)) for n in ("W_dec", "b_dec", "b_enc")
    )
    assert same != kept
    assert bool(trainer.refit_report) == kept
    if kept:
        assert trainer.refit_report["held_out_explained_variance"] == 0.9
        assert trainer.refit_report["held_out_explained_variance_before"] == 0.8


@pytest.mark.parametrize(
    ("architecture", "options"),
    [
        ("standard", {}),
        ("jumprelu", {}),
        ("matryoshka_batchtopk", {"matryoshka_widths": [16, 64]}),
        ("topk", {"skip_connection": True, "apply_b_dec_to_input": False}),
    ],
)
def test_the_refit_is_only_for_plain_sparse_reconstruction(architecture: str, options: dict) -> None:
    trainer = train(architecture, decoder_refit_tokens=10 * BATCH, **options)
    assert trainer.refit_report == {} and trainer.state.refit_inputs == []


def test_a_wide_sae_skips_the_refit_and_says_how_to_have_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sae_lens"):
        trainer = train("topk", decoder_refit_tokens=10 * BATCH, decoder_refit_max_latents=32)
    assert trainer.refit_report == {}
    assert "decoder refit skipped: d_sae 64 is over decoder_refit_max_latents (32)" in caplog.text


def test_the_decoder_lr_is_capped_at_its_scale_times_the_auto_lr() -> None:
    cfg = make_runner_config(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=4, lr=0.05)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    auto = cfg.auto_lr_for(D_SAE)
    assert auto < 0.05
    lrs = [group["initial_lr"] for group in trainer.state.optimizer.param_groups]
    assert lrs == [pytest.approx(0.05), pytest.approx(6 * auto)]
