"""Small float64 SAEs with known or seeded weights, shared by the tests of the base class and of the
standard, TopK and AuxK code."""

from __future__ import annotations

from typing import Any

import torch

from sae_lens.saes import SparseAutoencoder
from tests.conftest import make_sae_config

F64 = torch.float64


def make_sae(architecture: str = "standard", d_in: int = 6, d_sae: int = 10, seed: int = 0, **kw: Any):
    """A float64 SAE with random (seeded) unit-norm decoder rows and zero biases."""
    torch.manual_seed(seed)
    return SparseAutoencoder(make_sae_config(architecture, d_in, d_sae, dtype="float64", **kw))


def randomise(sae: SparseAutoencoder, seed: int = 1, b_enc_shift: float = 0.0, dec_scale: bool = False):
    """Give every parameter generic random values (decoder rows of varied norm if `dec_scale`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if b_enc_shift:  # (gated SAEs have no b_enc)
            sae.b_enc.add_(b_enc_shift)
        if dec_scale:
            sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1, generator=gen, dtype=F64) * 2 + 0.5)
    return sae


def rand_x(n: int, d: int, seed: int = 2) -> torch.Tensor:
    """`[n, d]` standard-normal float64 inputs, seeded."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def hand_sae(apply_b_dec_to_input: bool = True, **kw: Any) -> SparseAutoencoder:
    """d_in=2, d_sae=3 standard SAE with the weights used in the hand computations."""
    sae = make_sae("standard", d_in=2, d_sae=3, apply_b_dec_to_input=apply_b_dec_to_input, **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        # Row 2 has norm sqrt(2): not unit, so the decoder-norm weighting of L1 matters.
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    return sae


HAND_X = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=F64)
"""Inputs of the hand computations: with `hand_sae()` the reconstructions are [[1, 1], [5.5, 2]]."""
