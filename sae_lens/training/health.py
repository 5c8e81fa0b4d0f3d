"""The end-of-training check: what a trained SAE's final metrics and its loss curve say is wrong.

`training_warnings` reads the held-out metrics of the final evaluation and the logged training
losses, and returns one line per problem, each with the likely fix. The runner logs them and the
CLI prints them under the summary. Nothing here changes the SAE; a run with warnings still saves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DEAD_FRACTION_LIMIT = 0.10
"""More dead latents than this (of the dictionary) is wasted capacity worth a warning."""

LOSS_ROSE_FACTOR = 1.10
"""The loss at the end of training above this many times its lowest value early on: it rose."""

LOSS_SPIKE_FACTOR = 3.0
"""A logged loss above this many times the first step's: the steps overshoot (the divergence guard
stops a run only at `divergence_factor`, 100x by default)."""


def typical_explained_variance(l0: float) -> float:
    """A floor for the held-out explained variance an SAE reaches at a given L0.

    Deliberately low: a healthy TopK SAE on MiniLM's residual stream reaches about 0.8 at L0 32 after
    300k tokens (docs/quality.md), and a warning should only catch runs that are clearly off, so the
    floor is 0.35 at L0 4 rising by 0.1 per doubling of L0, capped at 0.7.
    """
    if l0 <= 0:
        return 0.0
    return min(0.7, max(0.0, 0.35 + 0.1 * math.log2(l0 / 4)))


def training_warnings(
    metrics: dict[str, Any], losses: Sequence[float], architecture: str = "", transcoder: bool = False
) -> list[str]:
    """One-line warnings, each with its fix, for a trained SAE.

    `metrics`: the final evaluation (`explained_variance`, `l0` on held-out tokens, without the
    `eval/` prefix) and `dead_fraction`, the share of latents that did not fire for the trainer's
    whole dead-latent window. `losses`: the first step's training loss, then the loss at each log.
    """
    found = []
    dead = metrics.get("dead_fraction")
    if isinstance(dead, (int, float)) and dead > DEAD_FRACTION_LIMIT:
        fix = (
            "raise aux_k_coefficient or lower lr"
            if architecture in ("topk", "batchtopk", "matryoshka_batchtopk")
            else "lower the sparsity coefficient or lr, or train a topk SAE (its AuxK loss revives dead latents)"
        )
        found.append(
            f"{dead:.0%} of the latents are dead (did not fire for the whole dead-latent window); {fix}"
        )
    first = losses[0] if losses else math.nan
    peak = max((value for value in losses[1:] if math.isfinite(value)), default=math.nan)
    if math.isfinite(first) and first > 0 and peak > LOSS_SPIKE_FACTOR * first:
        found.append(
            f"the training loss jumped to {peak / first:.1f}x its first-step value; the lr is too high: "
            "lower it (e.g. by 3x), add lr_warm_up_steps, or keep max_grad_norm set"
        )
    rose = loss_rose(losses)
    if rose is not None:
        low, last = rose
        found.append(
            f"the training loss rose from {low:.4g} to {last:.4g}; lower lr (e.g. by 3x) or add lr_warm_up_steps"
        )
    ev, l0 = metrics.get("explained_variance"), metrics.get("l0")
    if isinstance(ev, (int, float)) and isinstance(l0, (int, float)) and not transcoder:
        floor = typical_explained_variance(l0)
        if ev < floor:
            found.append(
                f"held-out explained variance {ev:.3f} is below the {floor:.2f} an SAE usually reaches at L0 "
                f"{l0:.1f}; train on more tokens, or try lr='auto' and the default decoder_init_norm"
            )
    return found


def loss_rose(losses: Sequence[float]) -> tuple[float, float] | None:
    """(lowest early loss, final loss) when the loss ended clearly above where it had been, else None.

    The final loss is the mean of the last fifth of the logs (one noisy batch is not a trend); it is
    compared with the lowest log in the first half.
    """
    values = [value for value in losses if math.isfinite(value)]
    if len(values) < 5:
        return None
    low = min(values[: len(values) // 2])
    tail = values[-max(1, len(values) // 5) :]
    last = sum(tail) / len(tail)
    return (low, last) if last > LOSS_ROSE_FACTOR * low else None
