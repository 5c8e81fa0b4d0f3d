"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse autoencoders").

Which latents fire and how strongly are decided by two paths that share the encoder directions:

- gate: `π_gate = sae_in @ W_enc + b_gate`, active where `π_gate > 0`;
- magnitude: `π_mag = sae_in @ (W_enc * exp(r_mag)) + b_mag`, `f = 1[π_gate > 0] * relu(π_mag)`.

The L1 penalty acts on the gate path only, so it does not shrink the magnitudes of active latents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sae_lens.saes.sae import (
    SAEConfig,
    SparseAutoencoder,
    TrainStepOutput,
    b_dec_gradient_path,
    per_token_squared_error,
    register_architecture,
)

if TYPE_CHECKING:
    from sae_lens.config import LanguageModelSAERunnerConfig


@register_architecture("gated")
class GatedSAE(SparseAutoencoder):
    """Gated SAE with SAELens 6.x parameter names.

    Parameters: `W_enc [d_in, d_sae]`, `b_gate [d_sae]`, `r_mag [d_sae]`, `b_mag [d_sae]`,
    `W_dec [d_sae, d_in]`, `b_dec [d_in]`; the base class's `b_enc` is removed, so `state_dict()`
    matches SAELens gated files key for key. Initialisation: the base's decoder and tied encoder,
    `b_gate = r_mag = b_mag = 0`.

    `encode_pre` (and `hook_hidden_pre`) give the magnitude pre-activation π_mag; `activation` is
    the magnitude ReLU alone, so `encode` (not `activation(encode_pre(x))`) applies the gate.

    Training loss (`training_forward_pass`):

    - `mse_loss`: ‖x - x̂‖² summed over d_in, mean over tokens;
    - `l1_loss`: `l1_coefficient` · mean over tokens of ‖relu(π_gate) ⊙ ‖W_dec rows‖‖_p
      (p = `lp_norm`, 1 by default);
    - `ghost_grad_loss` (the auxiliary loss, weight 1): ‖x - (relu(π_gate) @ W_dec + b_dec)‖² with
      W_dec and b_dec frozen (detached), so it trains only the gate encoder (W_enc, b_gate). With
      `apply_b_dec_to_input`, b_dec's part in π_gate is frozen too: the auxiliary loss sends no
      gradient to b_dec at all.

    Decoder rows are kept at unit norm during training (`normalize_decoder = True`). Ghost grads
    (`use_ghost_grads`) are not used by this architecture.
    """

    def __init__(self, cfg: SAEConfig | LanguageModelSAERunnerConfig) -> None:
        super().__init__(cfg)
        del self.b_enc  # the gate and magnitude paths have their own biases
        d_sae, dtype, device = self.cfg.d_sae, self.dtype, self.device
        self.b_gate = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    # -- forward --------------------------------------------------------------------------------

    def gate_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """π_gate `[..., d_sae]` from the encoder's input (`process_sae_in(x)`)."""
        return sae_in @ self.W_enc + self.b_gate

    def magnitude_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """π_mag `[..., d_sae]` from the encoder's input, through `hook_hidden_pre`."""
        return self._gate_and_magnitude_pre(sae_in)[1]

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """The magnitude pre-activation π_mag `[..., d_sae]` (the gate is applied by `encode`)."""
        return self.magnitude_pre(self.process_sae_in(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`f = 1[π_gate > 0] * relu(π_mag)` `[..., d_sae]`."""
        return self._encode_parts(self.process_sae_in(x))[0]

    def _gate_and_magnitude_pre(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag) from one matmul, as `sae_in @ (W_enc * exp(r_mag)) = (sae_in @ W_enc) * exp(r_mag)`."""
        projection = sae_in @ self.W_enc
        pi_gate = projection + self.b_gate
        pi_mag = self.hook_hidden_pre(torch.addcmul(self.b_mag, projection, torch.exp(self.r_mag)))
        return pi_gate, pi_mag

    def _encode_parts(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature_acts, π_gate)."""
        pi_gate, pi_mag = self._gate_and_magnitude_pre(sae_in)
        magnitudes = self.activation(pi_mag)
        # where() keeps only a boolean mask for backward; multiplying by a float mask would keep a
        # [batch, d_sae] float copy of it alive until the backward pass.
        feature_acts = self.hook_hidden_post(torch.where(pi_gate > 0, magnitudes, 0.0))
        return feature_acts, pi_gate

    # -- training -------------------------------------------------------------------------------

    def training_forward_pass(
        self,
        x: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None = None,
        l1_coefficient: float | None = None,
    ) -> TrainStepOutput:
        """MSE + gate L1 + frozen-decoder auxiliary reconstruction; `dead_neuron_mask` is unused."""
        sae_in = self.process_sae_in(x)
        feature_acts, pi_gate = self._encode_parts(sae_in)
        sae_out = self.decode(feature_acts)
        x = x.to(sae_out.dtype)
        mse_loss = per_token_squared_error(sae_out, x).mean()
        coefficient = self.cfg.l1_coefficient if l1_coefficient is None else l1_coefficient
        l1_loss = coefficient * self.sparsity_penalty(torch.relu(pi_gate))

        # The auxiliary path must not train b_dec, which π_gate depends on through `x - b_dec`. A
        # zero-valued term cancels that gradient, instead of a second [batch, d_sae] matmul.
        pi_gate_aux = pi_gate
        if self.cfg.apply_b_dec_to_input:
            pi_gate_aux = pi_gate + b_dec_gradient_path(self.b_dec, self.W_enc)
        via_gate = torch.relu(pi_gate_aux) @ self.W_dec.detach() + self.b_dec.detach()
        aux_loss = per_token_squared_error(via_gate, x).mean()
        loss = mse_loss + l1_loss + aux_loss
        return TrainStepOutput(sae_out, feature_acts, loss, mse_loss, l1_loss, aux_loss)

    # -- weight surgery -------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows; the norms scale W_enc's columns, b_gate and b_mag (r_mag stays).

        Both pre-activations scale by the (positive) norm, so the gate is unchanged and the
        magnitudes grow exactly as the decoder rows shrink.
        """
        norms = self.W_dec.norm(dim=-1)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_gate.mul_(norms)
        self.b_mag.mul_(norms)
