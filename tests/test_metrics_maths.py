"""Metric, geometric-median and schedule maths checked against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.evals import explained_variance, reconstruction_metrics
from sae_lens.geometric_median import geometric_median
from sae_lens.saes import SAEConfig, SparseAutoencoder
from sae_lens.training.lr_schedules import build_lr_lambda
from sae_lens.training.trainer import SAETrainer

# -- explained variance -------------------------------------------------------------------------------


def test_explained_variance_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
    # mean x = [3, 2]; Σ‖x - x̄‖² = (4 + 0) + (0 + 4) + (4 + 4) = 16
    # Σ‖x - x̂‖² = 1 + 1 + 1 = 3  ->  1 - 3/16
    assert explained_variance(x, x_hat) == pytest.approx(1 - 3 / 16, rel=1e-12)
    # The uncentred form 1 - Σ‖x - x̂‖² / Σ‖x‖² = 1 - 3/55 is a different number.
    assert explained_variance(x, x_hat) != pytest.approx(1 - 3 / 55, rel=1e-3)


def test_explained_variance_edge_cases() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) + 10.0
    assert explained_variance(x, x) == 1.0
    # Predicting the mean explains nothing; a large offset in x does not change that.
    assert explained_variance(x, x.mean(dim=0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, torch.zeros_like(x)) < -10


# -- reconstruction metrics ---------------------------------------------------------------------------


def hand_sae() -> SparseAutoencoder:
    """d_in=2, d_sae=3: latents 0 and 1 read relu(x_0), relu(x_1); latent 2 can never fire."""
    sae = SparseAutoencoder(SAEConfig(d_in=2, d_sae=3, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.zero_()
    return sae


def test_reconstruction_metrics_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, -2.0], [4.0, 1.0]])
    # latents: [1, 2, 0], [0, 3, 0], [2, 0, 0], [4, 1, 0]
    # x_hat = [2 f_0, f_1]: [2, 2], [0, 3], [4, 0], [8, 1]
    x_hat = torch.tensor([[2.0, 2.0], [0.0, 3.0], [4.0, 0.0], [8.0, 1.0]])
    metrics = reconstruction_metrics(hand_sae(), x, batch_size=3)  # 3: chunks of 3 and 1

    assert metrics["l0"] == pytest.approx((2 + 1 + 1 + 2) / 4)
    assert metrics["l1"] == pytest.approx((3 + 3 + 2 + 5) / 4)
    # squared errors 1, 1, 8, 16 over 4 tokens x 2 dims
    assert metrics["mse"] == pytest.approx(26 / 8)
    total = ((x - x.mean(dim=0)) ** 2).sum().item()
    assert metrics["explained_variance"] == pytest.approx(1 - 26 / total)

    cosines = [
        (2 + 4) / (math.sqrt(5) * math.sqrt(8)),
        9 / (math.sqrt(10) * 3),
        8 / (math.sqrt(8) * 4),
        33 / (math.sqrt(17) * math.sqrt(65)),
    ]
    assert metrics["cosine_similarity"] == pytest.approx(sum(cosines) / 4, rel=1e-6)
    ratios = [math.sqrt(8 / 5), 3 / math.sqrt(10), 4 / math.sqrt(8), math.sqrt(65 / 17)]
    assert metrics["l2_ratio"] == pytest.approx(sum(ratios) / 4, rel=1e-6)
    # E‖x̂‖² / E[x·x̂] = mean(8, 9, 16, 65) / mean(6, 9, 8, 33)
    assert metrics["relative_reconstruction_bias"] == pytest.approx(
        (8 + 9 + 16 + 65) / (6 + 9 + 8 + 33), rel=1e-6
    )
    # densities: latent 0 fires on tokens 0, 2, 3; latent 1 on 0, 1, 3; latent 2 never.
    torch.testing.assert_close(metrics["feature_density"], torch.tensor([0.75, 0.75, 0.0]))
    assert metrics["dead_fraction"] == pytest.approx(1 / 3)
    assert metrics["dense_fraction"] == pytest.approx(2 / 3)

    # Independent of the batching.
    whole = reconstruction_metrics(hand_sae(), x, batch_size=4096)
    for key in ("l0", "l1", "mse", "explained_variance", "cosine_similarity", "l2_ratio"):
        assert whole[key] == pytest.approx(metrics[key], rel=1e-6)
    torch.testing.assert_close(whole["feature_density"], metrics["feature_density"])
    # x_hat itself, as a sanity check of the hand values above.
    torch.testing.assert_close(hand_sae()(x.double()).float(), x_hat)


def test_dense_fraction_threshold() -> None:
    # 20 tokens: latent 0 fires on 2 (density 0.1, not dense), latent 1 on 3 (0.15, dense).
    sae = hand_sae()
    x = torch.full((20, 2), -1.0)
    x[:2, 0] = 1.0
    x[:3, 1] = 1.0
    metrics = reconstruction_metrics(sae, x)
    torch.testing.assert_close(metrics["feature_density"], torch.tensor([0.1, 0.15, 0.0]))
    assert metrics["dense_fraction"] == pytest.approx(1 / 3)
    assert metrics["dead_fraction"] == pytest.approx(1 / 3)


# -- geometric median ---------------------------------------------------------------------------------


def test_geometric_median_of_collinear_points_is_the_middle_one() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    torch.testing.assert_close(geometric_median(points), torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)


def test_geometric_median_of_square_is_centre() -> None:
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]) + torch.tensor([3.0, -1.0])
    torch.testing.assert_close(geometric_median(points), torch.tensor([4.0, 0.0]), atol=1e-5, rtol=0)


def test_geometric_median_resists_an_outlier() -> None:
    gen = torch.Generator().manual_seed(0)
    cluster = torch.randn(99, 3, generator=gen) * 0.1 + torch.tensor([1.0, 2.0, 3.0])
    points = torch.cat([cluster, torch.tensor([[1000.0, -1000.0, 1000.0]])])
    median = geometric_median(points)
    mean = points.mean(dim=0)
    assert (median - torch.tensor([1.0, 2.0, 3.0])).norm() < 0.1
    assert (mean - torch.tensor([1.0, 2.0, 3.0])).norm() > 10


def test_geometric_median_minimises_summed_distance() -> None:
    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(1)).double()
    median = geometric_median(points).double()

    def cost(c: torch.Tensor) -> float:
        return (points - c).norm(dim=1).sum().item()

    best = cost(median)
    assert best < cost(points.mean(dim=0)) + 1e-9
    for i in range(5):
        for delta in (1e-2, -1e-2):
            moved = median.clone()
            moved[i] += delta
            assert cost(moved) > best


# -- learning-rate schedules --------------------------------------------------------------------------


def schedule_cfg(**kw) -> LanguageModelSAERunnerConfig:
    # 10 steps of 10 tokens.
    return LanguageModelSAERunnerConfig(total_training_tokens=100, train_batch_size=10, lr=1e-3, **kw)


def test_constant_with_warm_up() -> None:
    f = build_lr_lambda(schedule_cfg(lr_warm_up_steps=4))
    assert [f(step) for step in range(7)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    g = build_lr_lambda(schedule_cfg())
    assert [g(step) for step in (0, 5, 9)] == [1.0, 1.0, 1.0]


def test_cosine_annealing_ends_at_lr_end() -> None:
    f = build_lr_lambda(schedule_cfg(lr_scheduler_name="cosineannealing", lr_end=1e-4))
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.55)  # halfway: floor + (1 - floor) / 2
    assert f(10) == pytest.approx(0.1)  # lr_end / lr
    values = [f(step) for step in range(11)]
    assert all(a > b for a, b in itertools.pairwise(values))
    # lr_end defaults to lr / 10.
    g = build_lr_lambda(schedule_cfg(lr_scheduler_name="cosineannealing"))
    assert g(10) == pytest.approx(0.1)
    # After warm-up the cosine starts from 1.
    h = build_lr_lambda(schedule_cfg(lr_scheduler_name="cosineannealing", lr_warm_up_steps=2, lr_end=0.0))
    assert [h(0), h(1), h(2)] == pytest.approx([0.5, 1.0, 1.0])
    assert h(6) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert h(10) == pytest.approx(0.0, abs=1e-12)


def test_cosine_warm_restarts_returns_to_one_at_cycle_start() -> None:
    f = build_lr_lambda(
        schedule_cfg(lr_scheduler_name="cosineannealingwarmrestarts", n_restart_cycles=2, lr_end=0.0)
    )
    # Two cycles of 5 steps.
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(1.0)
    assert f(4) < 0.2 and f(9) < 0.2
    assert [f(s) for s in range(5)] == pytest.approx([f(s) for s in range(5, 10)])
    assert f(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_schedule_drives_the_optimizer_lr() -> None:
    cfg = schedule_cfg(lr_scheduler_name="cosineannealing", lr_end=1e-4, lr_warm_up_steps=2)
    sae = SparseAutoencoder(SAEConfig(d_in=2, d_sae=4))
    trainer = SAETrainer(cfg, sae, show_progress=False)
    f = build_lr_lambda(cfg)
    for step in range(4):
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * f(step))
        trainer.train_step(torch.randn(10, 2))


def test_current_l1_coefficient_warm_up() -> None:
    cfg = schedule_cfg(architecture="standard", l1_coefficient=2.0, l1_warm_up_steps=4)
    trainer = SAETrainer(cfg, SparseAutoencoder(SAEConfig(d_in=2, d_sae=4)), show_progress=False)
    seen = []
    for _ in range(6):
        seen.append(trainer.current_l1_coefficient())
        metrics = trainer.train_step(torch.randn(10, 2))
        # The metric is reported after the step, i.e. for the next step's coefficient.
        assert metrics["l1_coefficient"] == trainer.current_l1_coefficient()
    assert seen == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    no_warm_up = SAETrainer(
        schedule_cfg(l1_coefficient=2.0), SparseAutoencoder(SAEConfig(d_in=2, d_sae=4)), show_progress=False
    )
    assert no_warm_up.current_l1_coefficient() == 2.0
