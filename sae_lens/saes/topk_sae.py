"""TopK SAE: each token keeps its k largest pre-activations; AuxK revives dead latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_lens.config_fields import non_negative, option, optional, positive, positive_int
from sae_lens.errors import SAELensError
from sae_lens.kernels import sparse_decode, sparse_topk_encode
from sae_lens.saes.aux_k import aux_k_loss
from sae_lens.saes.sae import SAEConfig, SparseAutoencoder, TrainingBatch, register_architecture

DECODER_LR_SCALE = 6.0
"""The TopK family's default `decoder_lr_scale` (`BatchTopKSAE` shares it)."""


@dataclass
class TopKSAEConfig(SAEConfig):
    """An SAE whose tokens each keep their k largest pre-activations."""

    k: int = option(32, positive_int)
    """Active latents per token."""
    aux_k: int | None = option(None, optional(positive_int))
    """Dead latents used by the AuxK loss; d_in // 2 when unset."""
    encoder_init_scale: float | None = option(None, optional(positive))
    """The encoder starts as the decoder's transpose times this. Unset: 16 / k, between 0.35 and 1
    (`initial_encoder_scale`: 1 at k 16 and below, 0.5 at k 32, 0.35 from k 46 up). A smaller
    encoder learns which latents win faster under Adam (each step is larger relative to it), but
    the fewer latents a token keeps, the more of them a small one starves: on the quality
    benchmark (docs/quality.md) k 16 loses a third of its latents at 0.5 or 0.7 and 0.7% at 1 on
    layer 3 (at 1 it still loses 3-5% on layers 1 and 5 at lr 1e-3); k 32 is best at 0.5 (0.3
    loses 5-9% at low lrs); k 64 keeps them all at 0.35 and reconstructs 1-6% better than at 0.5.
    1 starts it at the decoder's transpose, as the TopK paper does."""
    aux_k_coefficient: float = option(8.0, non_negative)
    """Weight of the AuxK loss (0 turns it off). 8, not the TopK paper's 1/32: on the quality
    benchmark it keeps the dictionary alive at k 32 at every lr tried, at no cost in FVU (k 16 on
    layers 1 and 5 still loses some: docs/quality.md)."""

    @property
    def initial_encoder_scale(self) -> float:
        """`encoder_init_scale`, or 16 / k clamped to [0.35, 1] when unset."""
        if self.encoder_init_scale is not None:
            return self.encoder_init_scale
        return min(1.0, max(0.35, 16 / self.k))

    def validate(self) -> None:
        super().validate()
        if self.k > self.d_sae:
            raise SAELensError(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")


@register_architecture("topk")
class TopKSAE(SparseAutoencoder):
    """Keeps the `cfg.k` largest pre-activations per token (then ReLU); no sparsity penalty.

    Training decodes only the k active rows and back-propagates into the encoder only through the
    active columns (`sae_lens.kernels`), so a step costs one dense matmul, not three. The sparse
    path bypasses the hooks: it never materialises the dense pre-activations.
    """

    config_class = TopKSAEConfig
    cfg: TopKSAEConfig
    # The sparse kernels' temporaries are small and regular, so keeping freed memory costs little
    # peak memory and saves page-faulting the step's working set back in (see cpu_memory).
    reuse_freed_cpu_memory = True
    # Adam moves each weight by about lr per step whatever its size, so a unit-norm decoder row
    # (entries ~ d_in ** -0.5) turns by only ~lr * sqrt(d_in) per step: at 1e-3 the decoder, not
    # the encoder, is what limits a short run. A larger decoder lr speeds that up without killing
    # latents (a larger encoder lr kills them); docs/quality.md has the rows.
    decoder_lr_scale = DECODER_LR_SCALE
    supports_decoder_refit = True

    @property
    def k(self) -> int:
        """Active latents per token."""
        return self.cfg.k

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        values, indices = hidden_pre.topk(self.k, dim=-1)
        return torch.zeros_like(hidden_pre).scatter_(-1, indices, torch.relu(values))

    def encode_for_training(self, x: torch.Tensor) -> TrainingBatch:
        sae_in, b_dec_path = self.encoder_input(x)
        latents = sparse_topk_encode(
            sae_in, self.W_enc, self.b_enc - b_dec_path, self.k, backend=self.kernel_backend
        )
        return TrainingBatch(x, latents.to_sparse_coo(), parts={"latents": latents})

    def decode_for_training(self, batch: TrainingBatch) -> torch.Tensor:
        return sparse_decode(batch.parts["latents"], self.W_dec, self.b_dec, backend=self.kernel_backend)

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        return aux_k_loss(self, batch)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Only a no-op is safe: rescaling pre-activations would change which k latents win."""
        norms = self.W_dec.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise SAELensError(
                "fold_W_dec_norm would change a TopK SAE's outputs (it rescales the pre-activations "
                "that compete for the top k); keep its decoder rows at unit norm instead"
            )
