"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): each latent fires only above its own
learned threshold, trained with straight-through estimators (STEs) of the threshold's gradient.

`f_i = pre_i * H(pre_i - θ_i)` with `H` the Heaviside step. `H` has zero derivative almost
everywhere, so the threshold learns through pseudo-derivatives: with the rectangle kernel
`K(u) = 1[-1/2 < u < 1/2]` and bandwidth `ε`,

- JumpReLU `x H(x - θ)`: d/dx = `H(x - θ)`, d/dθ = `-(θ/ε) K((x - θ)/ε)`;
- Step `H(x - θ)` (the L0 penalty): d/dx = 0, d/dθ = `-(1/ε) K((x - θ)/ε)`.

Only tokens whose pre-activation lies within ε/2 of a threshold move that threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sae_lens.config_fields import non_negative, one_of, option, optional, positive
from sae_lens.errors import SAELensError
from sae_lens.saes.sae import SAEConfig, SparseAutoencoder, TrainingBatch, register_architecture

SPARSITY_LOSS_MODES = ("step", "tanh")


_Grads = tuple[torch.Tensor | None, torch.Tensor | None, None]
"""What the backward passes return: the gradients of `x`, `threshold` and (none) `bandwidth`."""


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel: 1 on the open interval (-1/2, 1/2), else 0 (in `u`'s dtype)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _threshold_grad(
    x: torch.Tensor,
    threshold: torch.Tensor,
    eps: float,
    scale: torch.Tensor | float,
    grad_output: torch.Tensor,
) -> torch.Tensor:
    """`-(scale/ε) K((x - θ)/ε) * g` summed to θ's shape: θ's pseudo-derivative in both functions."""
    pseudo = -(scale / eps) * rectangle((x - threshold) / eps)
    return (pseudo * grad_output).sum_to_size(threshold.shape)


class JumpReLUFunction(torch.autograd.Function):
    """`x * H(x - θ)` with the STE gradient of the JumpReLU paper.

    Inputs: `x` `[..., d_sae]`, `threshold` broadcastable to `x` (normally `[d_sae]`), `bandwidth` ε.
    Backward: `grad_x = H(x - θ) * g`; `grad_θ = -(θ/ε) K((x - θ)/ε) * g`, summed to θ's shape.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> _Grads:
        x, threshold = ctx.saved_tensors
        grad_x = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_x = (x > threshold).to(grad_output.dtype) * grad_output
        if ctx.needs_input_grad[1]:
            grad_threshold = _threshold_grad(x, threshold, ctx.bandwidth, threshold, grad_output)
        return grad_x, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """`H(x - θ)` (1 where x > θ) with the STE gradient of the JumpReLU paper.

    Backward: zero gradient to `x` (returned as None); `grad_θ = -(1/ε) K((x - θ)/ε) * g`, summed
    to θ's shape.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> _Grads:
        x, threshold = ctx.saved_tensors
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = _threshold_grad(x, threshold, ctx.bandwidth, 1.0, grad_output)
        # None is autograd's zero gradient, without materialising a [batch, d_sae] tensor of zeros.
        return None, grad_threshold, None


def jumprelu(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`x * H(x - threshold)`, differentiable in `threshold` through the STE (see `JumpReLUFunction`)."""
    return JumpReLUFunction.apply(x, threshold, bandwidth)


def step(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`H(x - threshold)`, differentiable in `threshold` through the STE (see `StepFunction`)."""
    return StepFunction.apply(x, threshold, bandwidth)


def _log_threshold_dtype(device: torch.device) -> torch.dtype:
    # float64 makes threshold -> log -> threshold exact in the SAE's dtype; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class JumpReLUSAEConfig(SAEConfig):
    """A JumpReLU SAE: per-latent learned thresholds, trained with an L0-style penalty."""

    l1_coefficient: float = option(1e-3, non_negative)
    """Weight of the sparsity penalty (an L0 count here, despite the seed-era name)."""
    jumprelu_init_threshold: float = option(0.001, positive)
    """Initial per-latent threshold."""
    jumprelu_bandwidth: float = option(0.001, positive)
    """Width of the straight-through estimator's rectangle kernel."""
    jumprelu_sparsity_loss_mode: str = option("step", one_of(*SPARSITY_LOSS_MODES))
    """`step` (L0) or `tanh` (smooth L0) sparsity penalty."""
    jumprelu_tanh_scale: float = option(4.0, positive)
    """Scale inside tanh for the `tanh` penalty."""
    target_l0: float | None = option(None, optional(positive))
    """When set, the penalty is l1_coefficient * (L0 / target_l0 - 1)^2 instead."""


@register_architecture("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE: `f = pre * H(pre - θ)` with a learned per-latent threshold θ `[d_sae]`.

    Parameters: the base four (`W_enc`, `b_enc`, `W_dec`, `b_dec`) plus `log_threshold` `[d_sae]`.
    The threshold is trained in log space (θ = exp(log_threshold) stays positive and moves by
    relative steps, as in the paper and SAELens), but `state_dict()` and saved files hold `threshold`
    itself, exactly as SAELens 6.x writes it, so SAELens folders load directly and ours load there.
    `log_threshold` is kept in float64 (float32 on MPS), which makes the threshold -> log -> threshold
    trip exact for float32 and narrower SAE dtypes: loading a file reproduces its thresholds bit for
    bit.

    Thresholds are never negative (log parametrisation; loading rejects negative ones), so
    `pre * H(pre - θ)` equals SAELens' `relu(pre) * H(pre - θ)`.

    Training loss: MSE + `l1_coefficient` * sparsity penalty, the penalty chosen by the config:

    - `jumprelu_sparsity_loss_mode="step"`: mean over tokens of Σ_i H(pre_i - θ_i), the L0 count
      with the Step STE, as SAELens computes it. It is deliberately not weighted by ‖W_dec,i‖:
      with decoder rows free to change length, a weighted count falls when rows shrink while the
      encoder and thresholds grow to match, which changes neither the count nor the
      reconstruction, so training drifts that way instead of getting sparser (tried: decoder norms
      fell to ~0.003 and L0 rose);
    - `"tanh"`: mean over tokens of Σ_i tanh(jumprelu_tanh_scale · f_i ‖W_dec,i‖); here the
      weighting is what makes the penalty invariant to that rescaling;
    - `target_l0` set (overrides the mode): (L0 / target_l0 - 1)², L0 the STE step count averaged
      over tokens.

    Decoder rows are not renormalised during training (`normalize_decoder = False`), as in SAELens:
    both penalties are unchanged by moving length between a latent's encoder and decoder, so there
    is nothing to pin. `fold_W_dec_norm` moves the norms into the encoder and the thresholds when a
    unit-norm decoder is wanted. There is no dead-latent auxiliary loss; the penalty is the loss term `l0`.
    """

    config_class = JumpReLUSAEConfig
    cfg: JumpReLUSAEConfig
    normalize_decoder = False

    def init_encoder_parameters(self) -> None:
        super().init_encoder_parameters()
        init = torch.full((self.cfg.d_sae,), math.log(self.cfg.jumprelu_init_threshold), dtype=torch.float64)
        self.log_threshold = nn.Parameter(init.to(self.device, _log_threshold_dtype(self.device)))

    # -- threshold ------------------------------------------------------------------------------

    @property
    def threshold(self) -> torch.Tensor:
        """Per-latent threshold θ = exp(log_threshold) `[d_sae]`, in the weights' dtype (differentiable)."""
        return torch.exp(self.log_threshold).to(self.W_dec.dtype)

    @property
    def bandwidth(self) -> float:
        """The STE bandwidth ε."""
        return self.cfg.jumprelu_bandwidth

    # -- forward --------------------------------------------------------------------------------

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """JumpReLU `pre * H(pre - θ)` (no ReLU shift: a firing latent outputs its pre-activation)."""
        return jumprelu(hidden_pre, self.threshold, self.bandwidth)

    # -- training -------------------------------------------------------------------------------

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """The weighted sparsity penalty (see the class docstring); `dead_neuron_mask` is unused."""
        return {"l0": batch.l1_coefficient * self.sparsity_penalty(batch.feature_acts, batch.hidden_pre)}

    def sparsity_penalty(
        self, feature_acts: torch.Tensor, hidden_pre: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The unweighted sparsity penalty (before `l1_coefficient`) for latents `[batch, d_sae]`.

        The step and target-L0 forms need `hidden_pre` for the threshold's STE gradient; without it
        they count `feature_acts != 0` (same value, no gradient).
        """
        if hidden_pre is None:
            fired = (feature_acts != 0).to(feature_acts.dtype)
        else:
            fired = step(hidden_pre, self.threshold, self.bandwidth)
        if self.cfg.target_l0 is not None:
            l0 = fired.sum(dim=-1).mean()
            return (l0 / self.cfg.target_l0 - 1) ** 2
        if self.cfg.jumprelu_sparsity_loss_mode == "tanh":
            scale = self.cfg.jumprelu_tanh_scale
            return torch.tanh(scale * feature_acts * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        return fired.sum(dim=-1).mean()

    # -- weight surgery -------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows; the norms move into W_enc, b_enc and the thresholds (same outputs)."""
        norms = self.W_dec.norm(dim=-1)
        super().fold_W_dec_norm()
        self.log_threshold.add_(torch.log(norms.to(self.log_threshold.dtype)))

    # -- state dict: `threshold` outside, `log_threshold` inside ---------------------------------

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "log_threshold", None)
        if keep_vars:
            destination[prefix + "threshold"] = self.threshold
        else:
            with torch.no_grad():
                destination[prefix + "threshold"] = self.threshold

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "threshold"
        if key in state_dict:
            threshold = state_dict.pop(key)
            if (threshold < 0).any() or threshold.isnan().any():
                raise SAELensError("JumpReLU thresholds must be non-negative (and not NaN)")
            # A zero threshold becomes log_threshold = -inf, which exp maps back to exactly 0.
            state_dict[prefix + "log_threshold"] = torch.log(threshold.to(self.log_threshold.dtype))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
