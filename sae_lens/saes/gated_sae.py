"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse autoencoders").

Which latents fire and how strongly are decided by two paths that share the encoder directions:

- gate: `π_gate = sae_in @ W_enc + b_gate`, active where `π_gate > 0`;
- magnitude: `π_mag = sae_in @ (W_enc * exp(r_mag)) + b_mag`, `f = 1[π_gate > 0] * relu(π_mag)`.

The L1 penalty acts on the gate path only, so it does not shrink the magnitudes of active latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_lens.saes.sae import (
    L1PenaltyConfig,
    SparseAutoencoder,
    TrainingBatch,
    b_dec_gradient_path,
    decoder_weighted_lp,
    per_token_squared_error,
    register_architecture,
)


@dataclass
class GatedSAEConfig(L1PenaltyConfig):
    """A gated SAE: a gate path decides which latents fire, a magnitude path how strongly (the
    penalty acts on the gate path)."""


@register_architecture("gated")
class GatedSAE(SparseAutoencoder):
    """Gated SAE with SAELens 6.x parameter names.

    Parameters: `W_enc [d_in, d_sae]`, `b_gate [d_sae]`, `r_mag [d_sae]`, `b_mag [d_sae]`,
    `W_dec [d_sae, d_in]`, `b_dec [d_in]` (no `b_enc`), so `state_dict()` matches SAELens gated
    files key for key. Initialisation: the base's decoder and tied encoder, `b_gate = r_mag = b_mag = 0`.

    `encode_pre` (and `hook_hidden_pre`) give the magnitude pre-activation π_mag; `activation` is
    the magnitude ReLU alone, so `encode` (not `activation(encode_pre(x))`) applies the gate.

    Training losses:

    - `l1`: `l1_coefficient` · mean over tokens of ‖relu(π_gate) ⊙ ‖W_dec rows‖‖_p;
    - `gated_aux` (weight 1): ‖x - (relu(π_gate) @ W_dec + b_dec)‖² with W_dec and b_dec frozen
      (detached), so it trains only the gate encoder (W_enc, b_gate). With `apply_b_dec_to_input`,
      b_dec's part in π_gate is frozen too: the auxiliary loss sends no gradient to b_dec at all.

    Decoder rows are kept at unit norm during training (`normalize_decoder = True`).
    """

    config_class = GatedSAEConfig
    cfg: GatedSAEConfig

    def init_encoder_parameters(self) -> None:
        # The gate and magnitude paths have their own biases instead of b_enc.
        self.b_gate = self.new_parameter(self.cfg.d_sae)
        self.r_mag = self.new_parameter(self.cfg.d_sae)
        self.b_mag = self.new_parameter(self.cfg.d_sae)

    # -- forward --------------------------------------------------------------------------------

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """The magnitude pre-activation π_mag `[..., d_sae]` (the gate is applied by `encode`)."""
        return self.gate_and_magnitude_pre(x)[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`f = 1[π_gate > 0] * relu(π_mag)` `[..., d_sae]`."""
        return self.encode_for_training(x).feature_acts

    def gate_and_magnitude_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag) from one matmul, as `sae_in @ (W_enc * exp(r_mag)) = (sae_in @ W_enc) * exp(r_mag)`.

        The encoder input's b_dec path term (see `encoder_input`) enters both biases: π_gate's as
        is, π_mag's scaled by exp(r_mag), since π_mag = (projection - path) * exp(r_mag) + b_mag.
        """
        sae_in, b_dec_path = self.encoder_input(x)
        projection = sae_in @ self.W_enc
        magnitude_scale = torch.exp(self.r_mag)
        pi_gate = projection + (self.b_gate - b_dec_path)
        pi_mag = torch.addcmul(self.b_mag - b_dec_path * magnitude_scale, projection, magnitude_scale)
        return pi_gate, self.hook_hidden_pre(pi_mag)

    def encode_for_training(self, x: torch.Tensor) -> TrainingBatch:
        pi_gate, pi_mag = self.gate_and_magnitude_pre(x)
        magnitudes = self.activation(pi_mag)
        # where() keeps only a boolean mask for backward; multiplying by a float mask would keep a
        # [batch, d_sae] float copy of it alive until the backward pass.
        feature_acts = self.hook_hidden_post(torch.where(pi_gate > 0, magnitudes, 0.0))
        return TrainingBatch(x, feature_acts, pi_mag, parts={"pi_gate": pi_gate})

    # -- training -------------------------------------------------------------------------------

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """The gate L1 and the frozen-decoder auxiliary reconstruction; `dead_neuron_mask` is unused."""
        pi_gate = batch.parts["pi_gate"]
        l1 = batch.l1_coefficient * decoder_weighted_lp(torch.relu(pi_gate), self.W_dec, self.cfg.lp_norm)
        # The auxiliary path must not train b_dec, which π_gate depends on through `x - b_dec`. A
        # zero-valued term cancels that gradient, instead of a second [batch, d_sae] matmul.
        pi_gate_aux = pi_gate
        if self.cfg.apply_b_dec_to_input:
            pi_gate_aux = pi_gate + b_dec_gradient_path(self.b_dec, self.W_enc)
        via_gate = torch.relu(pi_gate_aux) @ self.W_dec.detach() + self.b_dec.detach()
        return {"l1": l1, "gated_aux": per_token_squared_error(via_gate, batch.goal).mean()}

    def sparsity_penalty(self, gate_acts: torch.Tensor) -> torch.Tensor:
        """The unweighted gate penalty of `relu(π_gate)` `[batch, d_sae]`, before `l1_coefficient`."""
        return decoder_weighted_lp(gate_acts, self.W_dec, self.cfg.lp_norm)

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
