"""The standard SAE: ReLU latents trained with an L1 penalty (and optional ghost grads)."""

from __future__ import annotations

from sae_lens.saes.sae import SparseAutoencoder, register_architecture


@register_architecture("standard")
class StandardSAE(SparseAutoencoder):
    """ReLU SAE trained on MSE + l1_coefficient * L1 (the base class's defaults, unchanged)."""

    # Its step keeps only two [batch, d_sae] buffers (kernels/relu_sums.py), so keeping freed
    # memory costs ~40 MB of peak at 4096 x 8192 and saves page-faulting them in every step.
    reuse_freed_cpu_memory = True
