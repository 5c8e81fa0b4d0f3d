"""Matryoshka BatchTopK SAE: nested prefixes of the latents must each reconstruct the input.

With widths `m_1 < m_2 < ... < m_n = d_sae` (`cfg.matryoshka_widths`), the latents the batch top-k
keeps are decoded once per prefix using only latents `< m_i`, and the training loss is the sum of
the prefix reconstruction losses (plus AuxK). Early latents are thus pushed to carry the most
general features on their own, later ones to refine them (Bussmann et al. / Nabeshima 2025).

Inference is BatchTopK's JumpReLU, and the SAE is saved as a `jumprelu` SAE in the same way.
"""

from __future__ import annotations

import itertools

import torch

from sae_lens.errors import SAELensError
from sae_lens.kernels.sparse_batchtopk import BatchTopKActs, sparse_csr_decode
from sae_lens.saes.batchtopk_sae import BatchTopKSAE
from sae_lens.saes.sae import (
    TrainStepOutput,
    per_token_squared_error,
    register_architecture,
    sparse_feature_acts,
)


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """`[d_sae // 16, d_sae // 4, d_sae]`, dropping widths that are 0 or repeated."""
    return sorted({w for w in (d_sae // 16, d_sae // 4, d_sae) if w > 0})


@register_architecture("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK SAE trained so that every prefix `latents[:m]`, `m in cfg.matryoshka_widths`,
    reconstructs the input on its own.

    `cfg.matryoshka_widths` must be strictly ascending positive integers ending at `d_sae`; when
    unset it is `default_matryoshka_widths(d_sae)` = `[d_sae//16, d_sae//4, d_sae]`.

    `training_forward_pass` returns `loss` = the sum over prefixes of each prefix's MSE (squared
    error summed over d_in, averaged over tokens) + AuxK; `mse_loss` and `sae_out` are those of the
    full width (so they compare with other architectures). The kept latents are decoded once: the
    entries are split into the bands `[m_{i-1}, m_i)`, each band is decoded sparsely, and the
    prefix reconstructions are running sums of the band outputs (plus `b_dec`).
    """

    def validate_config(self) -> None:
        super().validate_config()
        widths = self.cfg.matryoshka_widths
        if widths is None:
            return
        d_sae = self.cfg.d_sae
        if (
            not isinstance(widths, (list, tuple))
            or not widths
            or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
            or any(a >= b for a, b in itertools.pairwise(widths))
            or widths[-1] != d_sae
        ):
            raise SAELensError(
                "matryoshka_widths must be strictly ascending positive integers ending at "
                f"d_sae ({d_sae}); got {widths!r}"
            )

    @property
    def matryoshka_widths(self) -> list[int]:
        """The prefix widths in use (the configured ones or the default)."""
        widths = self.cfg.matryoshka_widths
        return list(widths) if widths is not None else default_matryoshka_widths(self.cfg.d_sae)

    def prefix_reconstructions(self, acts: BatchTopKActs) -> list[torch.Tensor]:
        """Reconstructions `[n_tokens, d_in]` from the latents below each width, in width order."""
        widths = self.matryoshka_widths
        if len(widths) == 1:
            return [sparse_csr_decode(acts, self.W_dec, self.b_dec)]
        bounds = torch.tensor(widths, dtype=acts.indices.dtype, device=acts.indices.device)
        band_of_entry = torch.bucketize(acts.indices, bounds, right=True)
        outputs: list[torch.Tensor] = []
        running: torch.Tensor | None = None
        for band in range(len(widths)):
            part = sparse_csr_decode(acts.subset(band_of_entry == band), self.W_dec, None)
            running = part + self.b_dec if running is None else running + part
            outputs.append(running)
        return outputs

    def training_forward_pass(
        self,
        x: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None = None,
        l1_coefficient: float | None = None,
    ) -> TrainStepOutput:
        """Sparse forward: the sum of the prefix MSEs plus AuxK (on the full-width residual)."""
        acts = self.encode_sparse(x)
        reconstructions = self.prefix_reconstructions(acts)
        prefix_losses = [per_token_squared_error(r, x).mean() for r in reconstructions]
        sae_out = reconstructions[-1]
        mse_loss = prefix_losses[-1]
        aux_loss = self.weighted_aux_k_loss(x, sae_out, dead_neuron_mask, mse_loss)
        loss = torch.stack(prefix_losses).sum() + aux_loss
        feature_acts = sparse_feature_acts(
            acts.rows, acts.indices, acts.values, acts.n_tokens, self.cfg.d_sae
        )
        zero = torch.zeros_like(mse_loss)
        return TrainStepOutput(sae_out, feature_acts, loss, mse_loss, zero, aux_loss)
