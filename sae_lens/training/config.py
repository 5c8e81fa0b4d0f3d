"""What the trainer needs to know: optimiser, schedule, dead latents, logging and checkpoints.

`SAETrainer` takes a `TrainerConfig`; the language-model runner config extends it with the model,
the data and the SAE, so every training option is declared here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sae_lens import distributed
from sae_lens.config_fields import (
    non_negative,
    non_negative_int,
    one_of,
    option,
    optional,
    positive,
    positive_int,
    unit_interval,
    validate_fields,
)
from sae_lens.errors import SAELensError

LR_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")
B_DEC_INIT_METHODS = ("geometric_median", "mean", "zeros")
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in")


def above_one(name: str, value: Any) -> None:
    """Over 1: a factor a loss must exceed its first value by (1 or less would stop at once)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
        raise SAELensError(
            f"{name} must be greater than 1 (a multiple of the first step's loss), got {value!r}"
        )


AUTO_LR_BASE = 1.4e-3
"""`auto_lr` at the reference point: d_sae 6144, 1024 tokens per step (docs/quality.md)."""


def auto_lr(d_sae: int, tokens_per_step: int) -> float:
    """The default learning rate: `AUTO_LR_BASE`, scaled by (6144 / d_sae) ** 0.5 (the OpenAI TopK
    paper's scaling law: the best lr falls as the inverse square root of the latent count) and by
    (tokens_per_step / 1024) ** 0.5 (larger batches average out more noise), capped at 1e-2."""
    return min(1e-2, AUTO_LR_BASE * (6144 / d_sae) ** 0.5 * (tokens_per_step / 1024) ** 0.5)


def or_auto(check: Callable[[str, Any], None], what: str) -> Callable[[str, Any], None]:
    """A field check that also accepts "auto" (whose meaning the field's docstring gives)."""

    def validate(name: str, value: Any) -> None:
        if value == "auto":
            return
        try:
            check(name, value)
        except SAELensError:
            raise SAELensError(f"{name} must be {what} or 'auto', got {value!r}") from None

    return validate


positive_or_auto = or_auto(positive, "positive")
non_negative_or_auto = or_auto(non_negative, "a non-negative number")


AUTO_DECAY_FRACTION = 0.2
"""`lr_decay_steps="auto"`'s share of the run at or below the auto lr."""


def auto_decay_fraction(lr_over_auto: float) -> float:
    """`lr_decay_steps="auto"` as a share of the run, for an lr `lr_over_auto` times the auto lr:
    0.2 up to 1, rising linearly to the whole run at 2."""
    return min(1.0, AUTO_DECAY_FRACTION + (1 - AUTO_DECAY_FRACTION) * max(0.0, lr_over_auto - 1))


@dataclass
class TrainerConfig:
    """How to train one SAE on a stream of `[batch, d_in]` activations."""

    # --- optimiser ---
    lr: float | str = option("auto", positive_or_auto)
    """Adam learning rate, or `auto`: fitted to the SAE's width and the batch size (`auto_lr`)."""
    adam_beta1: float = option(0.9, unit_interval)
    """Adam beta1."""
    adam_beta2: float = option(0.999, unit_interval)
    """Adam beta2."""
    lr_scheduler_name: str = option("constant", one_of(*LR_SCHEDULERS))
    """constant, cosineannealing or cosineannealingwarmrestarts."""
    lr_warm_up_steps: int = option(0, non_negative_int)
    """Steps of linear warm-up from 0 to `lr`."""
    lr_end: float | None = option(None, optional(non_negative))
    """Final LR of the cosine schedules and of `lr_decay_steps`; defaults to lr / 10 (0 for `lr_decay_steps` on a constant schedule)."""
    lr_decay_steps: int | float | str = option("auto", non_negative_or_auto)
    """Steps at the end of training over which the LR falls linearly to `lr_end` (0: none); a value below 1 is that fraction of the run. `auto`: the last 20% up to the auto lr, a longer decay above it, reaching the whole run at twice the auto lr (`auto_decay_fraction`): on the quality benchmark a dictionary trained above the auto lr loses up to 48% of its latents with a 20% decay and under 1% with a whole-run one."""
    decoder_lr_scale: float | None = option(None, optional(positive))
    """The decoder weights `W_dec` train at this multiple of the learning rate; unset: the architecture's default (6 for the TopK family, whose unit-norm decoder rows otherwise learn slowest, with the decoder's lr capped at 6 times the auto lr; 1 for the others)."""
    decoder_refit_tokens: int = option(131072, non_negative_int)
    """The last this many training tokens (at most half the run's) are kept; when training ends the trained encoder encodes them again and `W_dec`, `b_dec` become the least-squares fit to them (`sae_lens.training.decoder_refit`; 0: no refit). TopK and BatchTopK only (the others ignore it). Keeping them takes 4 x d_in bytes per token and SAE (200 MB at d_in 384), in checkpoints written during those steps too."""
    decoder_refit_ridge: float = option(0.1, non_negative)
    """How hard the refit pulls each decoder row towards its trained value, over the mean squared code of a latent in the kept tokens: a latent that fired on few of them keeps about its trained row."""
    decoder_refit_max_latents: int = option(16384, non_negative_int)
    """The refit is skipped (with a log line) for wider SAEs: its float64 Gram matrix takes 8 (d_sae + 1)^2 bytes (2.1 GB at 16384), and the solve as much again."""
    max_grad_norm: float | None = option(1.0, optional(positive))
    """Clip the gradient's total norm to this before each optimiser step (unset: no clipping)."""
    n_restart_cycles: int = option(1, positive_int)
    """Cycles of `cosineannealingwarmrestarts`."""
    l1_warm_up_steps: int = option(0, non_negative_int)
    """Steps over which the sparsity penalty ramps up linearly from 0."""

    # --- batching ---
    train_batch_size: int = option(1024, positive_int)
    """Activations (tokens) per optimiser step."""
    total_training_tokens: int = option(300_000, positive_int)
    """Training stops after this many activations."""

    # --- initialisation and input scale ---
    b_dec_init_method: str = option("geometric_median", one_of(*B_DEC_INIT_METHODS))
    """How to initialise the decoder bias from the first batch: geometric_median, mean or zeros."""
    normalize_activations: str = option("none", one_of(*NORMALIZE_ACTIVATIONS))
    """`expected_average_only_in` trains on inputs scaled to norm sqrt(d_in) and folds the scale into the saved weights."""

    # --- dead latents ---
    feature_sampling_window: int = option(200, positive_int)
    """Steps between logs of the feature-density histogram."""
    dead_feature_window: int = option(10, positive_int)
    """A latent that has not fired for this many steps is dead (ghost grads and AuxK act on it). 10: on the quality benchmark AuxK then leaves a fifth to a tenth as many latents dead as with 50 (docs/quality.md)."""
    dead_feature_window_tokens: int | None = option(None, optional(positive_int))
    """The same window in tokens (e.g. 10_000_000 as in the TopK papers); overrides the step count."""
    dead_feature_threshold: float = option(0.0, non_negative)
    """A latent whose firing rate over the last completed `feature_sampling_window` is below this also counts as dead (0: only the window rule)."""

    # --- logging and checkpoints ---
    wandb_log_frequency: int = option(10, positive_int)
    """Steps between metric logs (wandb and metrics.jsonl)."""
    eval_every_n_wandb_logs: int = option(10, positive_int)
    """Logs between evaluations on the held-out rows."""
    n_checkpoints: int = option(0, non_negative_int)
    """Intermediate checkpoints, evenly spaced; the final SAE is always saved."""
    keep_last_n_checkpoints: int | None = option(None, optional(positive_int))
    """Delete older checkpoints so that only the last this many remain (all are kept when unset)."""
    divergence_factor: float = option(100.0, above_one)
    """Stop when the loss exceeds this many times its value at the first step (or is NaN/Inf)."""

    # --- speed ---
    autocast: bool = False
    """Run the SAE's training forward and backward under torch.autocast in bfloat16 (weights and Adam stay in the SAE's dtype)."""
    cpu_reuse_freed_memory: bool | None = None
    """On CPU with glibc, keep freed memory for reuse during training instead of page-faulting it back every step (`sae_lens.cpu_memory`; restored when training ends). Unset: the architecture's default (on for standard and the TopK family; off for jumprelu and gated, whose many dense `[batch, d_sae]` temporaries fragment the kept memory: about 1.8x faster, but twice the peak memory)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that cannot work, naming the field and what it accepts."""
        validate_fields(self)
        if (
            self.lr_end is not None
            and isinstance(self.lr, (int, float))
            and self.lr_end > self.lr
            and (self.lr_scheduler_name != "constant" or self.lr_decay_steps)
        ):
            raise SAELensError(f"lr_end ({self.lr_end}) must not exceed lr ({self.lr})")

    def resolved_lr(self, d_sae: int) -> float:
        """The learning rate the optimiser uses: `lr`, or `auto_lr` for `lr="auto"`."""
        return self.auto_lr_for(d_sae) if self.lr == "auto" else float(self.lr)

    def auto_lr_for(self, d_sae: int) -> float:
        """What `lr="auto"` resolves to for an SAE of `d_sae` latents at this batch size."""
        return auto_lr(d_sae, self.train_batch_size * distributed.world_size())

    def decay_steps_for(self, lr: float, d_sae: int) -> int:
        """Steps of the final linear decay for base lr `lr` and an SAE of `d_sae` latents
        (`lr_decay_steps`: a fraction of the run when below 1; `auto`: `auto_decay_fraction`)."""
        value = self.lr_decay_steps
        total = self.total_training_steps
        if value == "auto":
            return round(auto_decay_fraction(lr / self.auto_lr_for(d_sae)) * total)
        value = float(value)
        return round(value * total) if 0 < value < 1 else int(value)

    @property
    def refit_steps(self) -> int:
        """Final steps whose batches the decoder refit keeps: `decoder_refit_tokens` (at most half
        the run's tokens) in whole steps."""
        tokens = min(self.decoder_refit_tokens, self.total_training_tokens // 2)
        return -(-tokens // (self.train_batch_size * distributed.world_size())) if tokens > 0 else 0

    @property
    def dead_window_steps(self) -> int:
        """Steps without firing after which a latent counts as dead."""
        if self.dead_feature_window_tokens is not None:
            return max(1, -(-self.dead_feature_window_tokens // self.train_batch_size))
        return self.dead_feature_window

    @property
    def total_training_steps(self) -> int:
        """Optimiser steps in the run (under torchrun each step trains on every rank's batch)."""
        return max(1, self.total_training_tokens // (self.train_batch_size * distributed.world_size()))
