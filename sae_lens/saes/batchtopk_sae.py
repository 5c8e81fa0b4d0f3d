"""BatchTopK SAE: the batch keeps its k·B largest pre-activations; inference is JumpReLU.

Training keeps the `k * B` largest pre-activations of the whole `[B, d_sae]` batch (then ReLU),
so tokens use variable numbers of latents averaging `k`. Because that rule depends on the rest of
the batch, inference instead uses a fixed threshold: `threshold` is an EMA (rate
`cfg.topk_threshold_lr`) of the smallest activation each training batch kept, and `encode` is the
JumpReLU `f = pre * (pre > threshold)` (as SAELens does, which saves BatchTopK SAEs as
JumpReLU ones; `save_model` does too by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_lens.kernels.sparse_batchtopk import (
    BatchTopKActs,
    sparse_batchtopk_encode,
    sparse_csr_decode,
)
from sae_lens.saes.sae import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    SAEConfig,
    SparseAutoencoder,
    TrainStepOutput,
    per_token_squared_error,
    register_architecture,
    sparse_feature_acts,
)
from sae_lens.saes.topk_sae import TopKSAE

JUMPRELU_ARCHITECTURE = "jumprelu"


def batch_topk(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense BatchTopK: keep the `k * n_tokens` largest entries of `hidden_pre` `[..., d_sae]`
    over all tokens together, ReLU them, zero the rest. The reference the sparse kernel matches."""
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    n_keep = min(k * (flat.numel() // d_sae), flat.numel())
    values, positions = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, positions, torch.relu(values)).view_as(hidden_pre)


@register_architecture("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024): `cfg.k` active latents per token on average.

    - `training_forward_pass` runs the sparse kernels of `sae_lens.kernels.sparse_batchtopk`
      (dense encoder matmul only; decode and encoder backward touch only the kept entries),
      updates `threshold` and adds the AuxK loss on dead latents as `TopKSAE` does.
    - `encode` / `forward` (any mode) are JumpReLU with `threshold`; `encode_batchtopk` gives the
      training rule densely. Before the first training step `threshold` is 0 (plain ReLU); the
      first batch sets it to its smallest kept activation, later batches move it by EMA.
    - `save_model(path)` writes a `jumprelu` SAE folder (the per-latent `threshold` included);
      `save_model(path, as_jumprelu=False)` writes a `batchtopk` folder that loads back as this class.
    """

    threshold: torch.Tensor

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        # Per latent so `fold_W_dec_norm` stays exact and the weights are JumpReLU's layout; the
        # EMA moves every entry by the same batch statistic.
        self.register_buffer("threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    # -- inference ------------------------------------------------------------------------------

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """JumpReLU with the learned threshold, `pre * (pre > threshold)`, exactly as the `jumprelu`
        architecture computes it (the threshold is never negative, so this is also ReLU'd)."""
        return hidden_pre * (hidden_pre > self.threshold).to(hidden_pre.dtype)

    def encode_batchtopk(self, x: torch.Tensor) -> torch.Tensor:
        """The training rule, densely: latents `[..., d_sae]` keeping the batch's k·tokens largest."""
        return batch_topk(self.encode_pre(x), self.k)

    # -- training -------------------------------------------------------------------------------

    def encode_sparse(self, x: torch.Tensor) -> BatchTopKActs:
        """The kept latents of `x` `[batch, d_in]` in CSR form; updates `threshold` in training mode."""
        encoder_in, bias = self.sparse_encoder_inputs(x)
        acts = sparse_batchtopk_encode(encoder_in, self.W_enc, bias, self.k)
        if self.training:
            self.update_threshold(acts.values)
        return acts

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

    def training_forward_pass(
        self,
        x: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None = None,
        l1_coefficient: float | None = None,
    ) -> TrainStepOutput:
        """Sparse BatchTopK forward: MSE plus AuxK on the latents marked dead. Hooks are bypassed."""
        acts = self.encode_sparse(x)
        sae_out = sparse_csr_decode(acts, self.W_dec, self.b_dec)
        mse_loss = per_token_squared_error(sae_out, x).mean()
        aux_loss = self.weighted_aux_k_loss(x, sae_out, dead_neuron_mask, mse_loss)
        feature_acts = sparse_feature_acts(
            acts.rows, acts.indices, acts.values, acts.n_tokens, self.cfg.d_sae
        )
        zero = torch.zeros_like(mse_loss)
        return TrainStepOutput(sae_out, feature_acts, mse_loss + aux_loss, mse_loss, zero, aux_loss)

    # -- weight surgery -------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows, norms moved into the encoder and the threshold.

        Inference (JumpReLU with a per-latent threshold) is unchanged, unlike for TopK, whose
        override refuses: each latent's pre-activation and threshold scale together. (The batch
        top-k competition of further training would see the rescaled pre-activations.)
        """
        norms = self.W_dec.norm(dim=-1)
        SparseAutoencoder.fold_W_dec_norm(self)
        self.threshold.mul_(norms)

    # -- saving ---------------------------------------------------------------------------------

    def save_model(
        self,
        path: str | Path,
        sparsity: torch.Tensor | None = None,
        *,
        as_jumprelu: bool = True,
    ) -> Path:
        """Write the SAE folder; by default as a `jumprelu` SAE, as SAELens saves BatchTopK.

        With `as_jumprelu` the folder's cfg.json says `"architecture": "jumprelu"` with `k` and
        `aux_k` cleared (inference does not use them; they are kept in `metadata` as
        `batchtopk_k` / `trained_architecture`) and the weights are `W_enc, b_enc, W_dec, b_dec,
        threshold [d_sae]`, so loading gives a JumpReLU SAE with the same inference outputs.
        With `as_jumprelu=False` it writes this architecture's own folder (same tensors).
        """
        if not as_jumprelu:
            return super().save_model(path, sparsity)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # The threshold buffer is already per latent, so the tensors are JumpReLU's as they are.
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(path / SAE_WEIGHTS_FILENAME))
        (path / SAE_CFG_FILENAME).write_text(json.dumps(self.jumprelu_config().to_dict(), indent=2))
        if sparsity is not None:
            save_file({"sparsity": sparsity.detach().cpu().contiguous()}, str(path / SPARSITY_FILENAME))
        return path

    def jumprelu_config(self) -> SAEConfig:
        """The config of the equivalent JumpReLU SAE (what `save_model` writes by default)."""
        metadata = dict(self.cfg.metadata)
        metadata.setdefault("trained_architecture", self.architecture_name)
        metadata.setdefault("batchtopk_k", self.cfg.k)
        values = self.cfg.to_dict()
        values.update(architecture=JUMPRELU_ARCHITECTURE, k=None, aux_k=None, metadata=metadata)
        return SAEConfig(**values)
