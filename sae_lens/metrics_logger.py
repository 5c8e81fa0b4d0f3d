"""Where metrics go: `metrics.jsonl` in the run folder always, wandb when asked.

wandb honours WANDB_MODE=offline, writing its run folder locally with no network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    """Appends one JSON object per `log` call to `output_dir/metrics.jsonl`, and mirrors it to wandb."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        use_wandb: bool = False,
        wandb_project: str = "sae_lens_training",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self.wandb_run: Any = None
        if use_wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_project,
                name=run_name,
                config=config,
                dir=str(self.output_dir),
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at `step`."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_histogram(self, name: str, values: torch.Tensor, step: int, bins: int = 50) -> None:
        """Record a histogram (e.g. log10 feature density) as bin counts in jsonl, natively in wandb."""
        finite = values[torch.isfinite(values)].float().cpu()
        if finite.numel() == 0:
            return
        low, high = finite.min().item(), finite.max().item()
        counts = torch.histc(finite, bins=bins, min=low, max=high if high > low else low + 1)
        self._file.write(
            json.dumps({"step": step, name: {"min": low, "max": high, "counts": counts.int().tolist()}})
            + "\n"
        )
        self._file.flush()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Histogram(finite.tolist())}, step=step)

    def close(self) -> None:
        """Flush and close the file and the wandb run."""
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
