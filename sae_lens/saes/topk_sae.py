"""TopK SAE: each token keeps its k largest pre-activations; AuxK revives dead latents."""

from __future__ import annotations

import torch

from sae_lens.errors import SAELensError
from sae_lens.kernels import sparse_decode, sparse_topk_encode
from sae_lens.saes.sae import (
    SparseAutoencoder,
    TrainStepOutput,
    linear,
    per_token_squared_error,
    register_architecture,
    sparse_feature_acts,
)


@register_architecture("topk")
class TopKSAE(SparseAutoencoder):
    """Keeps the `cfg.k` largest pre-activations per token (then ReLU); no sparsity penalty.

    Training decodes only the k active rows and back-propagates into the encoder only through the
    active columns (`sae_lens.kernels.sparse_topk`), so a step costs one dense matmul, not three.
    """

    uses_k = True
    # The sparse kernels' temporaries are small and regular, so keeping freed memory costs little
    # peak memory and saves page-faulting the step's working set back in (see cpu_memory).
    reuse_freed_cpu_memory = True

    def validate_config(self) -> None:
        k = self.cfg.k
        if k is None or k <= 0 or k > self.cfg.d_sae:
            raise SAELensError(f"topk SAE needs 0 < k <= d_sae ({self.cfg.d_sae}); got k={k!r}")

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Only a no-op is safe: rescaling pre-activations would change which k latents win."""
        norms = self.W_dec.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise SAELensError(
                "fold_W_dec_norm would change a TopK SAE's outputs (it rescales the pre-activations "
                "that compete for the top k); keep its decoder rows at unit norm instead"
            )

    @property
    def k(self) -> int:
        """Active latents per token."""
        assert self.cfg.k is not None
        return self.cfg.k

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        values, indices = hidden_pre.topk(self.k, dim=-1)
        return torch.zeros_like(hidden_pre).scatter_(-1, indices, torch.relu(values))

    def training_forward_pass(
        self,
        x: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None = None,
        l1_coefficient: float | None = None,
    ) -> TrainStepOutput:
        """Sparse forward and losses: MSE plus AuxK on the latents marked dead.

        Hooks are bypassed here: the sparse path never materialises the dense pre-activations.
        """
        encoder_in, bias = self.sparse_encoder_inputs(x)
        values, indices = sparse_topk_encode(encoder_in, self.W_enc, bias, self.k)
        sae_out = sparse_decode(values, indices, self.W_dec, self.b_dec)
        mse_loss = per_token_squared_error(sae_out, x).mean()
        aux_loss = self.weighted_aux_k_loss(x, sae_out, dead_neuron_mask, mse_loss)
        n_tokens, k = indices.shape
        rows = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
        feature_acts = sparse_feature_acts(
            rows, indices.flatten(), values.flatten(), n_tokens, self.cfg.d_sae
        )
        zero = torch.zeros_like(mse_loss)
        return TrainStepOutput(sae_out, feature_acts, mse_loss + aux_loss, mse_loss, zero, aux_loss)

    def weighted_aux_k_loss(
        self,
        x: torch.Tensor,
        sae_out: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """`aux_k_coefficient` * AuxK, or a zero shaped like `like` when no latent is dead."""
        if dead_neuron_mask is None or self.cfg.aux_k_coefficient <= 0 or not dead_neuron_mask.any():
            return torch.zeros_like(like)
        return self.cfg.aux_k_coefficient * self.aux_k_loss(x, sae_out, dead_neuron_mask)

    def aux_k_loss(
        self,
        x: torch.Tensor,
        sae_out: torch.Tensor,
        dead_neuron_mask: torch.Tensor,
    ) -> torch.Tensor:
        """AuxK: reconstruct the residual x - x̂ with the top k_aux dead latents.

        Normalised by the residual's variance so the loss is scale-free:
        ‖e - ê‖² / ‖e - ē‖². Only the dead columns of the encoder are multiplied, so the cost
        grows with the number of dead latents rather than with d_sae.
        """
        dead = dead_neuron_mask.nonzero().squeeze(1)
        k_aux = min(self.cfg.aux_k or self.cfg.d_in // 2, dead.numel())
        residual = (x.to(sae_out.dtype) - sae_out).detach()
        pre_dead = linear(x.to(self.dtype), self.W_enc[:, dead], self.encoder_bias()[dead])
        values, positions = pre_dead.topk(k_aux, dim=-1)
        residual_hat = sparse_decode(
            torch.relu(values), dead[positions], self.W_dec, torch.zeros_like(self.b_dec)
        )
        variance = per_token_squared_error(residual.mean(dim=0, keepdim=True), residual).mean()
        loss = per_token_squared_error(residual_hat, residual).mean() / variance.clamp_min(1e-12)
        return torch.nan_to_num(loss, nan=0.0)
