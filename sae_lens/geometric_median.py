"""The geometric median, used to initialise the decoder bias b_dec."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to `points` `[n, d]` -> `[d]`.

    Weiszfeld's iteration: a weighted mean with weights 1/distance, repeated. Distances are
    clamped away from zero so a median that lands on a data point does not divide by zero. The
    median resists the few huge-norm activations (e.g. at BOS) that drag a plain mean around.
    """
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (updated - median).norm() <= tol * max(1.0, median.norm().item()):
            median = updated
            break
        median = updated
    return median.float()
