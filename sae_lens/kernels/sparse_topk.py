"""Sparse TopK SAE training kernels written in plain PyTorch.

A TopK SAE computes::

    pre   = (x - b_dec) @ W_enc + b_enc        # [B, d_sae]
    acts  = relu(topk(pre, k))                 # k active latents per token
    x_hat = acts @ W_dec + b_dec               # [B, d_in]

The dense formulation pays for a dense ``[B, d_sae] @ [d_sae, d_in]`` decode
matmul and for three more dense matmuls in the backward pass (grad of
``W_enc``, of the encoder input and of ``W_dec``), although only ``k`` of the
``d_sae`` latents of each token are non-zero. The functions here keep the
activations in a ``(values [B, k], indices [B, k])`` form and express every
product that touches them as a sparse-times-dense product, so only the
encoder forward matmul stays dense.

Implementation choices (measured on a 2-core AVX-512 CPU with
``B=4096, d_in=512, d_sae=8192, k=32``, float32; see
``benchmarks/bench_sparse_topk.py``):

* The sparse products use ``torch.sparse_csr_tensor`` with one row per token
  (``crow = arange(0, B*k+1, k)``, so building it is free) and the MKL /
  cuSPARSE kernels behind ``@`` and ``torch.sparse.sampled_addmm``. This beat
  chunked ``index_add_`` (about 1.3x slower), ``embedding_bag`` used through
  autograd (its ``per_sample_weights`` backward is ~10x slower on CPU) and a
  gather + ``bmm`` (materialises ``[B, k, d_in]``).
* ``grad_W_enc`` is formed as ``csr.t() @ sae_in`` -> ``[d_sae, d_in]`` and then
  transposed into a contiguous ``[d_in, d_sae]`` tensor: spmm plus the copy is
  faster than the ``sae_in.T @ csr`` product that yields the layout directly.
* The encoder forward runs ``addmm`` + ``topk`` over row chunks, so the
  ``[B, d_sae]`` pre-activation matrix is never materialised at once (less
  memory, and slightly faster on CPU because each chunk stays in cache).

The MKL CSR kernels only support float32 / float64 (CPU ``bfloat16`` /
``float16`` raise), so other dtypes use an index-based fallback
(``index_add_``, ``embedding_bag``, gather + ``bmm``) that works everywhere.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["dense_from_sparse", "sparse_decode", "sparse_topk_encode"]

# Which implementation of the sparse products to use. "auto" picks CSR where
# the backend supports the dtype, else the index fallback. Tests set this to
# force one path.
_BACKEND: Literal["auto", "csr", "index"] = "auto"

# Element budget of one [rows, d_sae] pre-activation chunk in the encoder
# forward. On CPU ~4M elements (16 MiB in float32) was the fastest chunk in
# measurements; on accelerators a larger chunk keeps the matmul efficient
# while still bounding the transient memory.
_CHUNK_ELEMS_CPU = 1 << 22
_CHUNK_ELEMS_ACCEL = 1 << 26

# Element budget of the temporaries of the index fallback ([rows, k, d]).
_FALLBACK_CHUNK_ELEMS = 1 << 22

_CSR_DTYPES = (torch.float32, torch.float64)


def _use_csr(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the CSR kernels should be used for tensors of this dtype/device."""
    if _BACKEND != "auto":
        return _BACKEND == "csr"
    return dtype in _CSR_DTYPES and device.type in ("cpu", "cuda")


def _token_csr(indices: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Build the CSR matrix ``S [B, n_cols]`` with ``S[t, indices[t, j]] = values[t, j]``.

    ``indices`` ``[B, k]`` must be sorted ascending and distinct within each
    row (a CSR invariant). Every row holds exactly ``k`` entries, so the row
    pointer is an ``arange`` and no sorting or counting is needed.
    """
    n_rows, k = indices.shape
    crow = torch.arange(0, n_rows * k + 1, k, device=indices.device, dtype=indices.dtype)
    with warnings.catch_warnings():
        # The "CSR support is in beta" warning is noise for this use.
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
        return torch.sparse_csr_tensor(
            crow,
            indices.reshape(-1),
            values.reshape(-1),
            (n_rows, n_cols),
            check_invariants=False,
        )


def _fallback_chunk_rows(k: int, d: int) -> int:
    """Rows per chunk so that a ``[rows, k, d]`` temporary stays small."""
    return max(1, _FALLBACK_CHUNK_ELEMS // max(1, k * d))


def _scatter_rows(
    indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int
) -> torch.Tensor:
    """``out[i] = sum_{t,j : indices[t,j] == i} weights[t,j] * rows[t]``.

    Args:
        indices: ``[B, k]`` int64, sorted and distinct within each row.
        weights: ``[B, k]``.
        rows: ``[B, d]``.
        n_out: number of output rows.

    Returns:
        ``[n_out, d]`` contiguous, dtype of ``rows``. Used for ``grad_W_enc``
        (transposed afterwards) and ``grad_W_dec``.
    """
    if _use_csr(rows.dtype, rows.device):
        csr = _token_csr(indices, weights.to(rows.dtype), n_out)
        # S.t() is [n_out, B] in CSC layout; torch converts it for spmm.
        return (csr.t() @ rows).contiguous()
    # Accumulate low-precision dtypes in float32: index_add_ adds in the
    # destination dtype, and bf16 sums of ~B*k/n_out terms lose precision.
    acc_dtype = torch.float32 if rows.element_size() < 4 else rows.dtype
    out = torch.zeros(n_out, rows.shape[1], dtype=acc_dtype, device=rows.device)
    k = indices.shape[1]
    step = _fallback_chunk_rows(k, rows.shape[1])
    for s in range(0, indices.shape[0], step):
        e = s + step
        src = rows[s:e, None, :].to(acc_dtype) * weights[s:e, :, None].to(acc_dtype)
        out.index_add_(0, indices[s:e].reshape(-1), src.reshape(-1, rows.shape[1]))
    return out.to(rows.dtype)


def _gather_rows(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t,j] * table[indices[t,j]]``.

    Args:
        indices: ``[B, k]`` int64, sorted and distinct within each row.
        weights: ``[B, k]``.
        table: ``[n, d]``, may be a non-contiguous (transposed) view.

    Returns:
        ``[B, d]``, dtype of ``table``.
    """
    if _use_csr(table.dtype, table.device):
        csr = _token_csr(indices, weights.to(table.dtype), table.shape[0])
        # MKL/cuSPARSE accept a column-major dense operand, so a transposed
        # W_enc does not need to be copied first.
        return csr @ table
    # embedding_bag's slow path for strided tables is ~25x slower than the
    # contiguous one, so the copy pays for itself.
    return F.embedding_bag(
        indices,
        table.contiguous(),
        per_sample_weights=weights.to(table.dtype),
        mode="sum",
    )


def _sampled_dots(indices: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = <rows[t], table[indices[t, j]]>``.

    Args:
        indices: ``[B, k]`` int64, sorted and distinct within each row.
        rows: ``[B, d]``.
        table: ``[n, d]``.

    Returns:
        ``[B, k]``, dtype of ``rows``. This is ``rows @ table.T`` sampled at
        the active entries, i.e. the gradient w.r.t. the sparse values.
    """
    if _use_csr(rows.dtype, rows.device) and table.dtype == rows.dtype:
        pattern = _token_csr(
            indices,
            torch.zeros(indices.shape, dtype=rows.dtype, device=rows.device),
            table.shape[0],
        )
        # beta=0 ignores the pattern's values; only its sparsity is used.
        out = torch.sparse.sampled_addmm(pattern, rows, table.T, beta=0.0)
        return out.values().view(indices.shape)
    k = indices.shape[1]
    out = torch.empty(indices.shape, dtype=rows.dtype, device=rows.device)
    step = _fallback_chunk_rows(k, rows.shape[1])
    for s in range(0, indices.shape[0], step):
        e = s + step
        gathered = table[indices[s:e]].to(rows.dtype)  # [c, k, d]
        out[s:e] = torch.bmm(gathered, rows[s:e, :, None]).squeeze(-1)
    return out


def _sort_rows(
    values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sort ``indices`` ascending within each row, permuting ``values`` alike.

    Returns:
        ``(values [B, k], indices [B, k], perm [B, k] or None)``; ``perm`` maps
        sorted positions back to the caller's positions, ``None`` when the
        input was already sorted (checked on CPU only, where the check is cheap
        and does not force a device sync).
    """
    k = indices.shape[1]
    if k == 1:
        return values, indices, None
    if indices.device.type == "cpu" and bool((indices[:, 1:] > indices[:, :-1]).all()):
        return values, indices, None
    sorted_idx, perm = indices.sort(dim=-1)
    return values.gather(1, perm), sorted_idx, perm


class _SparseTopKEncode(torch.autograd.Function):
    """Autograd function behind :func:`sparse_topk_encode` (2-D inputs)."""

    @staticmethod
    def forward(
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        k: int,
        chunk_rows: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens = sae_in.shape[0]
        d_sae = W_enc.shape[1]
        if chunk_rows is None:
            budget = _CHUNK_ELEMS_CPU if sae_in.device.type == "cpu" else _CHUNK_ELEMS_ACCEL
            chunk_rows = max(1, budget // d_sae)
        chunk_rows = min(chunk_rows, max(1, n_tokens))

        out_dtype = W_enc.dtype
        b_enc_cast = b_enc.to(out_dtype)
        values = torch.empty(n_tokens, k, dtype=out_dtype, device=sae_in.device)
        indices = torch.empty(n_tokens, k, dtype=torch.long, device=sae_in.device)
        # One reused buffer: the full [B, d_sae] pre-activation matrix is never
        # alive, only [chunk_rows, d_sae] of it.
        buf = torch.empty(chunk_rows, d_sae, dtype=out_dtype, device=sae_in.device)
        for s in range(0, n_tokens, chunk_rows):
            e = min(n_tokens, s + chunk_rows)
            pre = torch.addmm(b_enc_cast, sae_in[s:e], W_enc, out=buf[: e - s])
            # Unsorted topk is enough: the latents are sorted by index below.
            torch.topk(pre, k, dim=-1, sorted=False, out=(values[s:e], indices[s:e]))
        # Canonical order: ascending latent index within each row. This is a
        # CSR invariant, so backward (and sparse_decode) can build the sparse
        # matrix without sorting again.
        if k > 1:
            indices, perm = indices.sort(dim=-1)
            values = values.gather(1, perm)
        mask = values > 0
        values = values.clamp_min_(0)  # ReLU; the indices are kept regardless.

        ctx.save_for_backward(sae_in, W_enc, indices, mask)
        ctx.d_sae = d_sae
        ctx.b_enc_dtype = b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_values: torch.Tensor | None, _grad_indices: Any
    ) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, indices, mask = ctx.saved_tensors
        grad_sae_in = grad_W_enc = grad_b_enc = None
        if grad_values is None:
            return None, None, None, None, None
        # ReLU gradient: latents whose pre-activation was <= 0 get none.
        g = grad_values * mask  # [B, k]

        if ctx.needs_input_grad[0]:
            # grad_sae_in[t] = sum_j g[t, j] * W_enc[:, idx[t, j]]
            grad_sae_in = _gather_rows(indices, g, W_enc.T).to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            # grad_W_enc[:, i] = sum_{t: i active} g[t, i] * sae_in[t]; built as
            # [d_sae, d_in] then copied into the parameter's [d_in, d_sae] layout
            # (AccumulateGrad would otherwise make the same copy).
            grad_W_enc = _scatter_rows(indices, g, sae_in, ctx.d_sae).to(W_enc.dtype).T.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(ctx.d_sae, dtype=g.dtype, device=g.device).index_add_(
                0, indices.reshape(-1), g.reshape(-1)
            )
            grad_b_enc = grad_b_enc.to(ctx.b_enc_dtype)
        return grad_sae_in, grad_W_enc, grad_b_enc, None, None


class _SparseDecode(torch.autograd.Function):
    """Autograd function for ``x_hat_no_bias[t] = sum_j values[t,j] * W_dec[indices[t,j]]``."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        values_s, indices_s, perm = _sort_rows(values, indices)
        out = _gather_rows(indices_s, values_s, W_dec)
        ctx.save_for_backward(values_s, indices_s, W_dec, perm)
        ctx.values_dtype = values.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        values_s, indices_s, W_dec, perm = ctx.saved_tensors
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            # d out[t] / d values[t, j] = W_dec[idx[t, j]], so the gradient is
            # grad_out @ W_dec.T sampled at the active latents.
            g_sorted = _sampled_dots(indices_s, grad_out.to(W_dec.dtype), W_dec)
            if perm is not None:
                # Back to the caller's order of the k entries.
                g_sorted = torch.empty_like(g_sorted).scatter_(1, perm, g_sorted)
            grad_values = g_sorted.to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            # grad_W_dec[i] = sum_{t: i active} values[t, i] * grad_out[t]; this is
            # already the parameter's layout.
            grad_W_dec = _scatter_rows(indices_s, values_s, grad_out.to(W_dec.dtype), W_dec.shape[0])
        return grad_values, None, grad_W_dec


def sparse_topk_encode(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK encoder returning the active latents in sparse form.

    Computes ``pre = sae_in @ W_enc + b_enc``, keeps the ``k`` largest entries of
    each row and applies ReLU to them. Entries among the top ``k`` whose
    pre-activation is ``<= 0`` keep their index, get value 0 and receive no
    gradient. Only ``sae_in``, ``W_enc``, the indices and a boolean ReLU mask
    are saved for backward (not the ``[B, d_sae]`` pre-activations), and the
    backward pass touches only the ``B * k`` active entries.

    Args:
        sae_in: ``[..., d_in]`` encoder input (typically ``x - b_dec``).
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.
        k: number of active latents per token, ``1 <= k <= d_sae``.
        chunk_rows: tokens per ``addmm`` + ``topk`` chunk in the forward pass;
            ``None`` picks a size bounding the transient ``[rows, d_sae]``
            buffer (~4M elements on CPU, ~64M elsewhere).

    Returns:
        ``(values [..., k], indices [..., k] int64)``. Indices are sorted
        ascending within each row (not by activation size); they are distinct,
        so the pair can be fed straight to :func:`sparse_decode`.
    """
    d_in, d_sae = W_enc.shape
    if sae_in.shape[-1] != d_in:
        raise ValueError(f"sae_in last dim {sae_in.shape[-1]} != W_enc rows {d_in}")
    if b_enc.shape != (d_sae,):
        raise ValueError(f"b_enc shape {tuple(b_enc.shape)} != ({d_sae},)")
    if sae_in.dtype != W_enc.dtype:
        # addmm(out=...) is not autocast, so mismatched dtypes would fail there.
        raise ValueError(f"sae_in dtype {sae_in.dtype} != W_enc dtype {W_enc.dtype}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in [1, {d_sae}], got {k}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    lead = sae_in.shape[:-1]
    values, indices = _SparseTopKEncode.apply(sae_in.reshape(-1, d_in), W_enc, b_enc, k, chunk_rows)
    return values.view(*lead, k), indices.view(*lead, k)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
) -> torch.Tensor:
    """Decode sparse activations: ``x_hat[t] = sum_j values[t,j] * W_dec[indices[t,j]] + b_dec``.

    Equivalent to ``dense_from_sparse(values, indices, d_sae) @ W_dec + b_dec``
    without forming the dense ``[B, d_sae]`` matrix; differentiable w.r.t.
    ``values``, ``W_dec`` and ``b_dec``.

    Args:
        values: ``[..., k]`` activations.
        indices: ``[..., k]`` int64 latent indices, distinct within each row
            (any order; :func:`sparse_topk_encode` output qualifies).
        W_dec: ``[d_sae, d_in]``.
        b_dec: ``[d_in]``.

    Returns:
        ``[..., d_in]`` reconstruction.
    """
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} differ")
    k = values.shape[-1]
    lead = values.shape[:-1]
    out = _SparseDecode.apply(values.reshape(-1, k), indices.reshape(-1, k).long(), W_dec)
    return out.view(*lead, W_dec.shape[1]) + b_dec


def dense_from_sparse(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Scatter sparse activations into a dense ``[..., d_sae]`` tensor (zeros elsewhere).

    Meant for reporting / metrics (e.g. feature firing statistics); it is
    differentiable w.r.t. ``values`` but costs ``O(B * d_sae)`` memory.

    Args:
        values: ``[..., k]``.
        indices: ``[..., k]`` int64, distinct within each row.
        d_sae: width of the dense output.

    Returns:
        ``[..., d_sae]``.
    """
    out = torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype, device=values.device)
    return out.scatter(-1, indices.long(), values)
