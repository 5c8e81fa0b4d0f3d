"""A metrics.jsonl like the trainer writes for a standard (L1) SAE, with the values known in advance.

Rows follow `sae_lens.training.trainer`: a scalar row every `log_every` steps (with eval/ keys every
`eval_every` logs), histogram rows for `log10_feature_density` every `density_every` steps and for
`eval/log10_feature_density` with each eval, and a final eval-only row without `tokens`. One loss term
is logged as `losses/<name>`, and one step has a non-finite (null) loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BATCH_TOKENS = 4096
D_SAE = 2048


def standard_run_rows(
    n_steps: int = 400, log_every: int = 10, eval_every: int = 5, density_every: int = 100
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n_logs = 0
    for step in range(1, n_steps + 1):
        if step % log_every == 0 or step == n_steps:
            n_logs += 1
            progress = step / n_steps
            mse = 400.0 * math.exp(-6 * progress) + 3.0  # 403 → ~4: spans far more than 10x
            l1_coefficient = 5.0 * min(1.0, step / 100)
            l1 = 0.02 * (1 - 0.5 * progress) * l1_coefficient * 10
            row: dict[str, Any] = {
                "step": step,
                "loss": mse + l1,
                "mse_loss": mse,
                "l1_loss": l1,
                "aux_loss": 0.0,
                "losses/orthogonality": 0.5 * math.exp(-3 * progress),
                "l0": 1000.0 * math.exp(-5 * progress) + 40,
                "explained_variance": 1 - 0.9 * math.exp(-4 * progress),
                "dead_fraction": 0.3 * progress**2,
                "lr": 4e-4 * min(1.0, step / 50) * (1 - 0.8 * progress),
                "l1_coefficient": l1_coefficient,
                "tokens": step * BATCH_TOKENS,
                "tokens_per_second": 50_000.0 + 10 * step,
            }
            if step == 50:
                row["loss"] = None  # what MetricsLogger writes for a nan/inf
            if n_logs % eval_every == 0:
                row.update(_eval_metrics(progress))
            rows.append(row)
            if n_logs % eval_every == 0:
                rows.append(
                    {"step": step, "eval/log10_feature_density": _density_hist(progress, eval_hist=True)}
                )
        if step % density_every == 0:
            rows.append(
                {"step": step, "log10_feature_density": _density_hist(step / n_steps, eval_hist=False)}
            )
    rows.append({"step": n_steps, **_eval_metrics(1.0, final=True)})
    rows.append({"step": n_steps, "eval/log10_feature_density": _density_hist(1.0, eval_hist=True)})
    return rows


def _eval_metrics(progress: float, final: bool = False) -> dict[str, float]:
    return {
        "eval/l0": 1000.0 * math.exp(-5 * progress) + 38,
        "eval/explained_variance": 1 - 0.92 * math.exp(-4 * progress),
        "eval/mse": 0.5 * math.exp(-4 * progress),
        "eval/dead_fraction": 0.25 * progress**2,
        "eval/ce_loss_score": 0.99 if final else 0.5 + 0.45 * progress,
        "eval/kl_div_score": 0.98 if final else 0.4 + 0.5 * progress,
    }


def _density_hist(progress: float, eval_hist: bool) -> dict[str, Any]:
    """50 bins from -10 (never fired) to -0.5; the dead bin grows with progress."""
    dead = int(D_SAE * 0.3 * progress**2)
    alive = D_SAE - dead
    counts = [0] * 50
    counts[0] = dead
    weights = [math.exp(-((i - 38) ** 2) / 20) for i in range(50)]
    total = sum(weights)
    placed = [int(alive * w / total) for w in weights]
    placed[38] += alive - sum(placed)
    counts = [c + p for c, p in zip(counts, placed, strict=True)]
    return {"min": -10.0, "max": -0.5 if not eval_hist else -0.4, "counts": counts}


def write_metrics(folder: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    rows = standard_run_rows() if rows is None else rows
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
