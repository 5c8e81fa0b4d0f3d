"""The standard SAE: ReLU latents trained with an L1 penalty (and optional ghost grads)."""

from __future__ import annotations

from sae_lens.saes.sae import SparseAutoencoder, register_architecture


@register_architecture("standard")
class StandardSAE(SparseAutoencoder):
    """ReLU SAE trained on MSE + l1_coefficient * L1 (the base class's defaults, unchanged)."""
