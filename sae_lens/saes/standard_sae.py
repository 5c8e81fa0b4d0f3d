"""The standard SAE: ReLU latents trained with an L1 penalty (and optional ghost grads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_lens.kernels import relu_with_column_sums
from sae_lens.saes.sae import (
    L1PenaltyConfig,
    SparseAutoencoder,
    TrainingBatch,
    decoder_weighted_lp,
    per_token_squared_error,
    register_architecture,
)


@dataclass
class StandardSAEConfig(L1PenaltyConfig):
    """A ReLU SAE trained on MSE + l1_coefficient * (decoder-norm-weighted L1)."""

    use_ghost_grads: bool = False
    """Ghost grads for latents marked dead."""


@register_architecture("standard")
class StandardSAE(SparseAutoencoder):
    """ReLU SAE trained on MSE + l1_coefficient * L1, optionally with ghost grads on dead latents."""

    config_class = StandardSAEConfig
    cfg: StandardSAEConfig
    # Its step keeps only two [batch, d_sae] buffers (kernels/relu_sums.py), so keeping freed
    # memory costs ~40 MB of peak at 4096 x 8192 and saves page-faulting them in every step.
    reuse_freed_cpu_memory = True

    def encode_for_training(self, x: torch.Tensor) -> TrainingBatch:
        hidden_pre = self.encode_pre(x)
        if not self._fused_relu_ok(hidden_pre):
            return TrainingBatch(x, self.hook_hidden_post(self.activation(hidden_pre)), hidden_pre)
        # Two [batch, d_sae] buffers per step instead of four (see kernels/relu_sums.py); the ReLU
        # overwrites the pre-activations, which nothing else needs on this path.
        feature_acts, column_sums = relu_with_column_sums(hidden_pre)
        return TrainingBatch(x, feature_acts, parts={"column_sums": column_sums})

    def _fused_relu_ok(self, hidden_pre: torch.Tensor) -> bool:
        """Whether the step may use `relu_with_column_sums`: an L1 penalty, no hooks on the latents,
        and no ghost grads (which read the pre-activations)."""
        return (
            self.cfg.lp_norm == 1
            and not self.cfg.use_ghost_grads
            and not self.hook_hidden_pre._forward_hooks
            and not self.hook_hidden_post._forward_hooks
            and hidden_pre.ndim == 2
        )

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        penalty = decoder_weighted_lp(
            batch.feature_acts, self.W_dec, self.cfg.lp_norm, batch.parts.get("column_sums")
        )
        losses = {"l1": batch.l1_coefficient * penalty}
        dead = batch.dead_neuron_mask
        if self.cfg.use_ghost_grads and dead is not None and dead.any():
            assert batch.hidden_pre is not None  # the fused path is off with ghost grads
            losses["ghost_grad"] = ghost_grads_loss(
                batch.goal, batch.output, batch.hidden_pre, self.W_dec, dead
            )
        return losses

    def sparsity_penalty(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """The unweighted L1 (lp) penalty of latents `[batch, d_sae]`, before `l1_coefficient`."""
        return decoder_weighted_lp(feature_acts, self.W_dec, self.cfg.lp_norm)


def ghost_grads_loss(
    x: torch.Tensor,
    sae_out: torch.Tensor,
    hidden_pre: torch.Tensor,
    W_dec: torch.Tensor,
    dead_neuron_mask: torch.Tensor,
) -> torch.Tensor:
    """Ghost grads: let dead latents learn to explain the residual, without touching live ones.

    The dead latents' exp(pre-activation) decodes to a "ghost" output, rescaled to half the
    residual's norm so it cannot swamp it; its error against the detached residual is then scaled
    to the size of the main MSE (the factor is detached) so it has a comparable gradient magnitude.
    """
    residual = (x.to(sae_out.dtype) - sae_out).detach()
    mse_loss = per_token_squared_error(sae_out, x).mean()
    ghost_acts = torch.exp(hidden_pre[:, dead_neuron_mask])
    ghost_out = ghost_acts @ W_dec[dead_neuron_mask]
    scale = residual.norm(dim=-1) / (2 * ghost_out.norm(dim=-1) + 1e-6)
    ghost_out = ghost_out * scale[:, None].detach()
    ghost_mse = per_token_squared_error(ghost_out, residual).mean()
    rescale = (mse_loss / (ghost_mse + 1e-6)).detach()
    return rescale * ghost_mse
