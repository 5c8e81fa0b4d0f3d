"""Learning-rate schedules as multipliers of the base LR, with linear warm-up in front."""

from __future__ import annotations

import math
from collections.abc import Callable

from sae_lens.training.config import TrainerConfig


def build_lr_lambda(cfg: TrainerConfig) -> Callable[[int], float]:
    """`step -> LR multiplier` for `torch.optim.lr_scheduler.LambdaLR`.

    Warm-up rises linearly from 1/warm_up to 1 over `lr_warm_up_steps`; after it, `constant`
    stays at 1, `cosineannealing` falls along a half cosine to lr_end / lr at the last step, and
    `cosineannealingwarmrestarts` does that `n_restart_cycles` times.
    """
    total = cfg.total_training_steps
    warm_up = cfg.lr_warm_up_steps
    floor = (cfg.lr_end if cfg.lr_end is not None else cfg.lr / 10) / cfg.lr
    decay_steps = max(1, total - warm_up)
    cycle = max(1, math.ceil(decay_steps / cfg.n_restart_cycles))

    def multiplier(step: int) -> float:
        if step < warm_up:
            return (step + 1) / warm_up
        if cfg.lr_scheduler_name == "constant":
            return 1.0
        progress = step - warm_up
        if cfg.lr_scheduler_name == "cosineannealing":
            fraction = min(1.0, progress / decay_steps)
        else:
            fraction = (progress % cycle) / cycle
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction))

    return multiplier
