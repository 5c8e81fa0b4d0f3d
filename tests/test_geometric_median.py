"""The geometric median (sae_lens/geometric_median.py) against hand-known answers and its defining
property."""

from __future__ import annotations

import torch

from sae_lens.geometric_median import geometric_median

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
