"""Custom training kernels for SAEs, written in plain PyTorch."""

from sae_lens.kernels.sparse_topk import (
    dense_from_sparse,
    sparse_decode,
    sparse_topk_encode,
)

__all__ = ["dense_from_sparse", "sparse_decode", "sparse_topk_encode"]
