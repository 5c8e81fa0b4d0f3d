"""Learning-rate schedules as multipliers of the base LR, with linear warm-up in front."""

from __future__ import annotations

import math
from collections.abc import Callable

from sae_lens.training.config import TrainerConfig


def build_lr_lambda(
    cfg: TrainerConfig, lr: float | None = None, d_sae: int | None = None
) -> Callable[[int], float]:
    """`step -> LR multiplier` of base LR `lr` (`cfg.lr` when not given) for `LambdaLR`, for an SAE
    of `d_sae` latents (needed only by `lr_decay_steps="auto"`).

    Warm-up rises linearly from 1/warm_up to 1 over `lr_warm_up_steps`; after it, `constant`
    stays at 1, `cosineannealing` falls along a half cosine to lr_end / lr at the last step, and
    `cosineannealingwarmrestarts` does that `n_restart_cycles` times. With `lr_decay_steps`, a
    constant schedule then falls linearly to lr_end / lr (0 when unset) over the last steps.
    """
    if lr is None:
        if cfg.lr == "auto":
            raise ValueError("lr='auto' resolves per SAE; pass the resolved lr (TrainerConfig.resolved_lr)")
        lr = float(cfg.lr)
    total = cfg.total_training_steps
    warm_up = cfg.lr_warm_up_steps
    floor = (cfg.lr_end if cfg.lr_end is not None else lr / 10) / lr
    decay_steps = max(1, total - warm_up)
    cycle = max(1, math.ceil(decay_steps / cfg.n_restart_cycles))
    final = 0
    if cfg.lr_scheduler_name == "constant":  # the only schedule with a final decay
        if cfg.lr_decay_steps == "auto" and d_sae is None:
            raise ValueError("lr_decay_steps='auto' depends on the SAE's width; pass d_sae")
        final = min(cfg.decay_steps_for(lr, d_sae or 1), total - warm_up)
    final_floor = (cfg.lr_end or 0.0) / lr

    def multiplier(step: int) -> float:
        if step < warm_up:
            return (step + 1) / warm_up
        if cfg.lr_scheduler_name == "constant":
            left = total - step  # steps still to take, this one included
            return (
                final_floor + (1 - final_floor) * left / (final + 1) if final > 0 and left <= final else 1.0
            )
        progress = step - warm_up
        if cfg.lr_scheduler_name == "cosineannealing":
            fraction = min(1.0, progress / decay_steps)
        else:
            fraction = (progress % cycle) / cycle
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction))

    return multiplier
