"""Matryoshka BatchTopK SAE: nested prefixes of the latents must each reconstruct the input.

With widths `m_1 < m_2 < ... < m_n = d_sae` (`cfg.matryoshka_widths`), the latents the batch top-k
keeps are decoded once per prefix using only latents `< m_i`, and the training loss is the sum of
the prefix reconstruction losses (plus AuxK). Early latents are thus pushed to carry the most
general features on their own, later ones to refine them (Bussmann et al. / Nabeshima 2025).

Inference is BatchTopK's JumpReLU, and the SAE is saved as a `jumprelu` SAE in the same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from sae_lens.config_fields import option
from sae_lens.errors import SAELensError
from sae_lens.kernels import sparse_decode
from sae_lens.saes.batchtopk_sae import BatchTopKSAE, BatchTopKSAEConfig
from sae_lens.saes.sae import TrainingBatch, per_token_squared_error, register_architecture


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """`[d_sae // 16, d_sae // 4, d_sae]`, dropping widths that are 0 or repeated."""
    return sorted({w for w in (d_sae // 16, d_sae // 4, d_sae) if w > 0})


@dataclass
class MatryoshkaBatchTopKSAEConfig(BatchTopKSAEConfig):
    """A BatchTopK SAE whose latent prefixes each reconstruct the input."""

    matryoshka_widths: list[int] | None = option(None)
    """Nested prefix widths (strictly ascending, last = d_sae); `[d_sae//16, d_sae//4, d_sae]` when unset."""

    def validate(self) -> None:
        super().validate()
        widths = self.matryoshka_widths
        if widths is None:
            return
        if (
            not isinstance(widths, (list, tuple))
            or not widths
            or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
            or any(a >= b for a, b in itertools.pairwise(widths))
            or widths[-1] != self.d_sae
        ):
            raise SAELensError(
                "matryoshka_widths must be strictly ascending positive integers ending at "
                f"d_sae ({self.d_sae}); got {widths!r}"
            )


@register_architecture("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK SAE trained so that every prefix `latents[:m]`, `m in cfg.matryoshka_widths`,
    reconstructs the input on its own.

    The training losses are `mse` (the full width's, so it compares with other architectures),
    `matryoshka_prefix_i` for each narrower prefix i, and AuxK on the full-width residual; `loss`
    is their sum. The kept latents are decoded once: the entries are split into the bands
    `[m_{i-1}, m_i)`, each band is decoded sparsely, and the prefix reconstructions are running
    sums of the band outputs (plus `b_dec`).
    """

    config_class = MatryoshkaBatchTopKSAEConfig
    cfg: MatryoshkaBatchTopKSAEConfig
    # A least-squares fit of the full reconstruction would undo what the prefix losses ask for.
    supports_decoder_refit = False

    @property
    def matryoshka_widths(self) -> list[int]:
        """The prefix widths in use (the configured ones or the default)."""
        widths = self.cfg.matryoshka_widths
        return list(widths) if widths is not None else default_matryoshka_widths(self.cfg.d_sae)

    def prefix_reconstructions(self, batch: TrainingBatch) -> list[torch.Tensor]:
        """Reconstructions `[n_tokens, d_in]` from the latents below each width, in width order."""
        latents = batch.parts["latents"]
        widths = self.matryoshka_widths
        if len(widths) == 1:
            return [sparse_decode(latents, self.W_dec, self.b_dec, backend=self.kernel_backend)]
        bounds = torch.tensor(widths, dtype=latents.indices.dtype, device=latents.indices.device)
        band_of_entry = torch.bucketize(latents.indices, bounds, right=True)
        outputs: list[torch.Tensor] = []
        running: torch.Tensor | None = None
        for band in range(len(widths)):
            band_latents = latents.subset(band_of_entry == band)
            part = sparse_decode(band_latents, self.W_dec, None, backend=self.kernel_backend)
            running = part + self.b_dec if running is None else running + part
            outputs.append(running)
        return outputs

    def decode_for_training(self, batch: TrainingBatch) -> torch.Tensor:
        reconstructions = self.prefix_reconstructions(batch)
        batch.parts["prefix_reconstructions"] = reconstructions[:-1]
        return reconstructions[-1]

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        losses = {
            f"matryoshka_prefix_{i}": per_token_squared_error(reconstruction, batch.goal).mean()
            for i, reconstruction in enumerate(batch.parts["prefix_reconstructions"])
        }
        return losses | super().auxiliary_losses(batch)
