"""Custom training kernels for SAEs, written in plain PyTorch.

- `csr`: `SparseLatents` (CSR activations), `sparse_decode`, the sparse products and the choice
  of kernels behind them;
- `topk` / `batchtopk`: the TopK and BatchTopK encoders with sparse output;
- `relu_sums`: the dense standard SAE's ReLU with column sums.
"""

from sae_lens.kernels.batchtopk import sparse_batchtopk_encode
from sae_lens.kernels.csr import Backend, SparseLatents, sparse_decode
from sae_lens.kernels.relu_sums import relu_with_column_sums
from sae_lens.kernels.topk import sparse_topk_encode

__all__ = [
    "Backend",
    "SparseLatents",
    "relu_with_column_sums",
    "sparse_batchtopk_encode",
    "sparse_decode",
    "sparse_topk_encode",
]
