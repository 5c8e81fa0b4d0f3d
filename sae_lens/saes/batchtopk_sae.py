"""BatchTopK SAE: the batch keeps its k·B largest pre-activations; inference is JumpReLU.

Training keeps the `k * B` largest pre-activations of the whole `[B, d_sae]` batch (then ReLU),
so tokens use variable numbers of latents averaging `k`. Because that rule depends on the rest of
the batch, inference instead uses a fixed threshold: `threshold` is an EMA (rate
`cfg.topk_threshold_lr`) of the smallest activation each training batch kept, and `encode` is the
JumpReLU `f = pre * (pre > threshold)`. As SAELens does, the SAE is saved as the equivalent
`jumprelu` SAE by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sae_lens.config_fields import option, positive
from sae_lens.kernels import SparseLatents, sparse_batchtopk_encode, sparse_decode
from sae_lens.saes.aux_k import aux_k_loss
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, SparseAutoencoder, TrainingBatch, register_architecture
from sae_lens.saes.topk_sae import DECODER_LR_SCALE, TopKSAEConfig


def batch_topk(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense BatchTopK: keep the `k * n_tokens` largest entries of `hidden_pre` `[..., d_sae]`
    over all tokens together, ReLU them, zero the rest. The reference the sparse kernel matches."""
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    n_keep = min(k * (flat.numel() // d_sae), flat.numel())
    values, positions = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, positions, torch.relu(values)).view_as(hidden_pre)


@dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    """A TopK SAE whose k is a per-token average over the batch."""

    topk_threshold_lr: float = option(0.01, positive)
    """EMA rate of the inference threshold (the smallest kept activation)."""


@register_architecture("batchtopk")
class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK SAE (Bussmann et al. 2024): `cfg.k` active latents per token on average.

    - Training runs the sparse kernels (dense encoder matmul only; decode and encoder backward touch
      only the kept entries), updates `threshold` and adds the AuxK loss on dead latents.
    - `encode` / `forward` (any mode) are JumpReLU with `threshold`; `encode_batchtopk` gives the
      training rule densely. Before the first training step `threshold` is 0 (plain ReLU); the
      first batch sets it to its smallest kept activation, later batches move it by EMA.
    - `save_model(path)` writes a `jumprelu` SAE folder (the per-latent `threshold` included);
      `save_model(path, as_jumprelu=False)` writes a `batchtopk` folder that loads back as this class.
    """

    config_class = BatchTopKSAEConfig
    cfg: BatchTopKSAEConfig
    reuse_freed_cpu_memory = True
    decoder_lr_scale = DECODER_LR_SCALE  # as TopK's, for the same reason
    supports_decoder_refit = True
    threshold: torch.Tensor

    def init_encoder_parameters(self) -> None:
        super().init_encoder_parameters()
        # Per latent so `fold_W_dec_norm` stays exact and the weights are JumpReLU's layout; the
        # EMA moves every entry by the same batch statistic.
        self.register_buffer("threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    @property
    def k(self) -> int:
        """Mean active latents per token."""
        return self.cfg.k

    # -- inference ------------------------------------------------------------------------------

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """JumpReLU with the learned threshold, `pre * (pre > threshold)`, exactly as the `jumprelu`
        architecture computes it (the threshold is never negative, so this is also ReLU'd)."""
        return hidden_pre * (hidden_pre > self.threshold).to(hidden_pre.dtype)

    def encode_batchtopk(self, x: torch.Tensor) -> torch.Tensor:
        """The training rule, densely: latents `[..., d_sae]` keeping the batch's k·tokens largest."""
        return batch_topk(self.encode_pre(x), self.k)

    # -- training -------------------------------------------------------------------------------

    def encode_sparse(self, x: torch.Tensor) -> SparseLatents:
        """The kept latents of `x` `[batch, d_in]`; updates `threshold` in training mode."""
        sae_in, b_dec_path = self.encoder_input(x)
        latents = sparse_batchtopk_encode(
            sae_in, self.W_enc, self.b_enc - b_dec_path, self.k, backend=self.kernel_backend
        )
        if self.training:
            self.update_threshold(latents.values)
        return latents

    def encode_for_training(self, x: torch.Tensor) -> TrainingBatch:
        latents = self.encode_sparse(x)
        return TrainingBatch(x, latents.to_sparse_coo(), parts={"latents": latents})

    def decode_for_training(self, batch: TrainingBatch) -> torch.Tensor:
        return sparse_decode(batch.parts["latents"], self.W_dec, self.b_dec, backend=self.kernel_backend)

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        return aux_k_loss(self, batch)

    @torch.no_grad()
    def update_threshold(self, kept_values: torch.Tensor) -> None:
        """EMA of the smallest kept (positive) activation; the first batch sets it outright.

        A threshold of exactly 0 everywhere means "not set yet" (kept activations are > 0, so the
        EMA of them never returns to 0). A batch with no positive activation leaves it alone.
        """
        if kept_values.numel() == 0:
            return
        smallest = kept_values.detach().min().to(self.threshold.dtype)
        if bool((self.threshold == 0).all()):
            self.threshold.fill_(smallest)
        else:
            self.threshold.lerp_(smallest, self.cfg.topk_threshold_lr)

    # -- weight surgery and saving --------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows, norms moved into the encoder and the threshold.

        Inference (JumpReLU with a per-latent threshold) is unchanged, unlike for TopK, which
        refuses: each latent's pre-activation and threshold scale together. (The batch top-k
        competition of further training would see the rescaled pre-activations.)
        """
        norms = self.W_dec.norm(dim=-1)
        super().fold_W_dec_norm()
        self.threshold.mul_(norms)

    def jumprelu_config(self) -> SAEConfig:
        """The config of the equivalent JumpReLU SAE, which is what `save_model` writes by default.

        The training-only options (k, aux_k, ...) are not JumpReLU options; `metadata` keeps
        `trained_architecture` and `batchtopk_k` so the folder records how it was trained.
        """
        metadata = dict(self.cfg.metadata)
        metadata.setdefault("trained_architecture", self.architecture_name)
        metadata.setdefault("batchtopk_k", self.cfg.k)
        return JumpReLUSAEConfig(
            d_in=self.cfg.d_in,
            d_sae=self.cfg.d_sae,
            dtype=self.cfg.dtype,
            device=self.cfg.device,
            apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
            decoder_init_norm=self.cfg.decoder_init_norm,
            metadata=metadata,
        )

    def save_model(
        self,
        path: str | Path,
        sparsity: torch.Tensor | None = None,
        *,
        input_scale: float = 1.0,
        config: SAEConfig | None = None,
        as_jumprelu: bool = True,
    ) -> Path:
        """Write the SAE folder; by default as the equivalent `jumprelu` SAE, as SAELens saves BatchTopK.

        The weights are `W_enc, b_enc, W_dec, b_dec, threshold [d_sae]` either way; with
        `as_jumprelu=False` the cfg.json names this architecture, so the folder loads back as it.
        """
        if config is None:
            config = self.jumprelu_config() if as_jumprelu else self.cfg
        return super().save_model(path, sparsity, input_scale=input_scale, config=config)
