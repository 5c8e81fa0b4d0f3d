"""Everything one SAE's training carries from step to step, in one object with a state dict.

Saving `TrainingState.state_dict()` and loading it into a fresh state built from the same config
continues training exactly where it stopped: the SAE's parameters and buffers (BatchTopK's
threshold among them), Adam's moments, the LR schedule, the firing counters, the step and token
counts, the input scale, and the batches kept for the decoder refit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sae_lens.errors import SAELensError
from sae_lens.saes.sae import SparseAutoencoder
from sae_lens.training.config import TrainerConfig
from sae_lens.training.lr_schedules import build_lr_lambda


class TrainingState:
    """One SAE in training: the SAE, its optimiser and schedule, and its counters."""

    def __init__(self, cfg: TrainerConfig, sae: SparseAutoencoder) -> None:
        self.sae = sae
        self.lr = cfg.resolved_lr(sae.cfg.d_sae)
        """The base learning rate (`lr`, or what `lr="auto"` resolves to for this SAE)."""
        self.decoder_lr_scale = (
            cfg.decoder_lr_scale
            if cfg.decoder_lr_scale is not None
            else max(1.0, sae.decoder_lr_scale * min(1.0, cfg.auto_lr_for(sae.cfg.d_sae) / self.lr))
        )
        """`W_dec`'s learning rate over the base one: `TrainerConfig.decoder_lr_scale`, or the
        architecture's scale with the decoder's lr capped at that scale times the auto lr, and never
        below the base lr (above the cap the decoder's fast rows kill latents: docs/quality.md)."""
        others = [param for name, param in sae.named_parameters() if name != "W_dec"]
        groups: list[dict[str, Any]] = [
            {"params": others},
            {"params": [sae.W_dec], "lr": self.lr * self.decoder_lr_scale},
        ]
        # The first group has the base lr, which the logs and `scheduler.get_last_lr()[0]` report.
        self.optimizer = torch.optim.Adam(
            groups, lr=self.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, build_lr_lambda(cfg, self.lr, sae.cfg.d_sae)
        )
        d_sae, device = sae.cfg.d_sae, sae.device
        self.steps_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        """Steps since each latent last fired `[d_sae]`."""
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64, device=device)
        """Tokens each latent fired on over the whole run `[d_sae]`."""
        self.window_fire_counts = torch.zeros(d_sae, dtype=torch.float64, device=device)
        """The same over the current feature-sampling window."""
        self.below_threshold = torch.zeros(d_sae, dtype=torch.bool, device=device)
        """Latents whose rate in the last completed window was below `dead_feature_threshold`."""
        self.window_tokens = 0
        self.n_steps = 0
        self.n_tokens = 0
        self.input_scale = 1.0
        """Training inputs are `input_scale * x` (`normalize_activations`); folded in on save."""
        self.initialised = False
        """Whether b_dec and the input scale have been set from the first batch."""
        self.first_loss = math.nan
        """The loss of the first step, the yardstick of the divergence guard (NaN until then)."""
        self.refit_inputs: list[torch.Tensor] = []
        """The batches of the final steps, kept for the decoder refit (training scale)."""
        self.refit_targets: list[torch.Tensor] = []
        """Their targets, for a transcoder (empty for an SAE)."""

    _COUNTERS = ("steps_since_fired", "fire_counts", "window_fire_counts", "below_threshold")
    _NUMBERS = ("window_tokens", "n_steps", "n_tokens", "input_scale", "initialised", "first_loss")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training (tensors are copies)."""
        return {
            # The training form (JumpReLU's float64 log-threshold, not its saved threshold), so that a
            # resumed run continues from bit-identical parameters.
            "sae": {
                **{name: tensor.detach().clone() for name, tensor in self.sae.named_parameters()},
                **{name: tensor.clone() for name, tensor in self.sae.named_buffers()},
            },
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **{name: getattr(self, name).clone() for name in self._COUNTERS},
            **{name: getattr(self, name) for name in self._NUMBERS},
            **(
                {"refit_inputs": list(self.refit_inputs), "refit_targets": list(self.refit_targets)}
                if self.refit_inputs
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, into a state built from the same config and SAE shape."""
        missing = {"sae", "optimizer", "scheduler", *self._COUNTERS, *self._NUMBERS} - set(state)
        if missing:
            raise SAELensError(f"training state is incomplete (missing: {', '.join(sorted(missing))})")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in self._COUNTERS:
            getattr(self, name).copy_(state[name])
        for name in self._NUMBERS:
            setattr(self, name, type(getattr(self, name))(state[name]))
        device = self.sae.device
        self.refit_inputs = [tensor.to(device) for tensor in state.get("refit_inputs", [])]
        self.refit_targets = [tensor.to(device) for tensor in state.get("refit_targets", [])]
