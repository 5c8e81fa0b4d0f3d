"""Sparse TopK SAE training kernels written in plain PyTorch.

A TopK SAE computes::

    pre   = (x - b_dec) @ W_enc + b_enc        # [B, d_sae]
    acts  = relu(topk(pre, k))                 # k active latents per token
    x_hat = acts @ W_dec + b_dec               # [B, d_in]

The dense formulation pays for a dense ``[B, d_sae] @ [d_sae, d_in]`` decode
matmul and for four more dense matmuls in the backward pass (grads of the
activations, of ``W_dec``, of ``W_enc`` and of the encoder input), although
only ``k`` of the ``d_sae`` latents of each token are non-zero. The functions here keep the
activations in a ``(values [B, k], indices [B, k])`` form and express every
product that touches them as a sparse-times-dense product, so only the
encoder forward matmul stays dense.

Implementation choices (measured with ``benchmarks/bench_sparse_topk.py`` and
per-op micro-benchmarks at ``B=4096, d_in=512, d_sae=8192, k=32`` on a 2-core
AVX-512 CPU and at ``B=16384, d_in=768, d_sae=32768, k=64`` on an H200):

* The sparse products treat the activations as a CSR matrix ``S [B, d_sae]``
  with one row per token (``crow = arange(0, B*k+1, k)``, so building it costs
  nothing) and use the MKL / cuSPARSE kernels behind ``@`` and
  ``torch.sparse.sampled_addmm``; ``embedding_bag`` is used where it measured
  faster. Per op (the "auto" backend):

  - ``S.T @ rows`` (``grad_W_enc``, ``grad_W_dec``): ``csr.t() @ rows``
    everywhere. Chunked ``index_add_`` was ~1.5x slower on CPU and ~7x on
    CUDA, ``rows.T @ S`` (which yields ``grad_W_enc``'s layout directly)
    ~1.5x slower on CPU even counting the transposing copy we then need.
  - ``S @ table`` (decode forward, ``grad_sae_in``): ``embedding_bag`` on CPU
    (~15% faster than MKL spmm), cuSPARSE spmm on CUDA (~3x faster than
    ``embedding_bag``). Letting autograd differentiate ``embedding_bag`` is no
    option: its ``per_sample_weights`` backward made the decoder's fwd+bwd
    ~8x slower on CPU than these kernels.
  - ``rows @ table.T`` sampled at the active entries (``grad_values`` of the
    decoder): MKL SDDMM on CPU (~6x faster than gather + ``bmm``), gather +
    ``bmm`` on CUDA (~3.5x faster than cuSPARSE SDDMM, and it runs in bf16).

* The encoder forward runs ``addmm`` + ``topk`` over row chunks, so the
  ``[B, d_sae]`` pre-activation matrix is never materialised at once: less
  memory, and ~15% faster on CPU because each chunk stays in cache (on CUDA
  the chunks are large enough to cost within noise of one full-batch call).
  On CUDA the top-k itself is an exact two-stage selection (see
  :func:`_topk_rows`), 2.5-3x faster than ``torch.topk`` over wide rows.

Kernels that lack a dtype (MKL has no half-precision sparse kernels, neither
backend has a half-precision SDDMM) fall back to ``index_add_`` /
``embedding_bag`` / gather + ``bmm``, which run for every dtype and device.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sae_lens.kernels.inputs import autocast_inputs, autocast_off, check_encoder_inputs

__all__ = ["dense_from_sparse", "sparse_decode", "sparse_topk_encode"]

# Which implementations of the sparse products to use:
# "auto":  the fastest measured choice per op, device and dtype (see below);
# "csr":   sparse-matrix kernels (MKL / cuSPARSE) wherever they support the
#          dtype and device;
# "index": never sparse-matrix kernels, only embedding_bag / index_add_ /
#          gather + bmm, which work for every dtype and device.
# Tests set this to exercise every path.
_BACKEND: Literal["auto", "csr", "index"] = "auto"

# Element budget of one [rows, d_sae] pre-activation chunk in the encoder
# forward. On CPU ~4M elements (16 MiB in float32, 512 rows at d_sae 8192)
# was the fastest chunk (cache-resident, ~15% faster than one full-batch
# addmm + topk). On accelerators a larger chunk keeps the matmul and topk
# efficient while still bounding the transient memory.
_CHUNK_ELEMS_CPU = 1 << 22
_CHUNK_ELEMS_ACCEL = 1 << 27

# Whether the encoder's row-wise top-k uses the exact two-stage selection of
# _topk_rows, per device type. On an H200 it cut topk time 2.5-3x at
# d_sae=32768 (whole sparse step: -13% fp32, -23% bf16). On a quiet 2-core
# CPU it halves topk on 512-row chunks (8 -> 4 ms at d_sae 8192, k 32) and
# cuts the whole TopK step by ~15%; it loses only when other processes
# compete for the cores. Tests flip it to cover both paths.
_TOPK_PREFILTER: dict[str, bool] = {"cpu": True, "cuda": True}

# Element budget of the [rows, k, d] temporaries of the index fallback: small
# on CPU to stay in cache, larger elsewhere to amortise kernel launches.
_FALLBACK_CHUNK_ELEMS_CPU = 1 << 22
_FALLBACK_CHUNK_ELEMS_ACCEL = 1 << 26

# dtypes of the sparse x dense products (MKL has no CPU half kernels; cuSPARSE
# has them).
_SPMM_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
# dtypes of torch.sparse.sampled_addmm (no half types on either backend).
_SDDMM_DTYPES = (torch.float32, torch.float64)


def _spmm_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``csr @ dense`` / ``csr.t() @ dense`` run for this dtype/device."""
    return _BACKEND != "index" and dtype in _SPMM_DTYPES.get(device.type, ())


def _token_csr(indices: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Build the CSR matrix ``S [B, n_cols]`` with ``S[t, indices[t, j]] = values[t, j]``.

    ``indices`` ``[B, k]`` must be sorted ascending and distinct within each
    row (a CSR invariant). Every row holds exactly ``k`` entries, so the row
    pointer is an ``arange`` and no sorting or counting is needed.
    """
    n_rows, k = indices.shape
    crow = torch.arange(0, n_rows * k + 1, k, device=indices.device, dtype=indices.dtype)
    return _csr(crow, indices.reshape(-1), values.reshape(-1), n_cols)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The CSR matrix ``[len(crow) - 1, n_cols]``; its invariants hold by construction, so they
    are not checked. Shared with ``sparse_batchtopk``."""
    with warnings.catch_warnings():
        # "CSR support is in beta" and (some torch versions, even with the
        # explicit flag) "invariant checks are implicitly disabled" are noise
        # here: the invariants hold by construction.
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")
        return torch.sparse_csr_tensor(crow, col, values, (crow.shape[0] - 1, n_cols), check_invariants=False)


# The last pattern built by _transposed_pattern: (key, the latents tensor it came from, pattern).
# Holding the tensor keeps its memory from being reused by another tensor that could then match
# the key by accident.
_last_transpose: tuple[tuple[Any, ...], torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None


def _transposed_pattern(latents: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent-major (``S.T``) order of sparse entries: ``(order, crow)``.

    ``latents`` holds each entry's latent, entries in token order (``[B, k]`` for TopK, the flat
    CSR column indices for BatchTopK). ``order`` lists the entries sorted by latent, ties kept in
    token order (a stable sort), and ``crow`` is the row pointer of ``S.T``; the caller maps
    ``order`` to token ids for the column indices. One sort, about half the cost of torch's
    CSC-to-CSR conversion. A training step needs it twice with the same latents (``grad_W_dec`` in
    the decoder's backward, ``grad_W_enc`` in the encoder's), so the last one is cached, keyed by
    the tensor's memory, shape and version counter.
    """
    global _last_transpose
    key = (
        latents.untyped_storage().data_ptr(),
        latents.storage_offset(),
        tuple(latents.shape),
        latents.stride(),
        latents._version,
        n_out,
    )
    if _last_transpose is not None and _last_transpose[0] == key:
        return _last_transpose[2]
    flat = latents.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n_out + 1, dtype=torch.long, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=n_out), 0, out=crow[1:])
    _last_transpose = (key, latents, (order, crow))
    return order, crow


def _fallback_chunk_rows(k: int, d: int, device: torch.device) -> int:
    """Rows per chunk so that a ``[rows, k, d]`` temporary stays bounded."""
    budget = _FALLBACK_CHUNK_ELEMS_CPU if device.type == "cpu" else _FALLBACK_CHUNK_ELEMS_ACCEL
    return max(1, budget // max(1, k * d))


def _scatter_rows(
    indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int
) -> torch.Tensor:
    """``out[i] = sum_{t,j : indices[t,j] == i} weights[t,j] * rows[t]``.

    This is ``S.T @ rows`` for the token-by-latent sparse matrix ``S``.

    Args:
        indices: ``[B, k]`` int64, sorted and distinct within each row.
        weights: ``[B, k]``.
        rows: ``[B, d]``.
        n_out: number of output rows.

    Returns:
        ``[n_out, d]`` contiguous, dtype of ``rows``. Used for ``grad_W_enc``
        (transposed afterwards) and ``grad_W_dec``.
    """
    if _spmm_ok(rows.dtype, rows.device):
        # Fastest measured on CPU (~1.5x chunked index_add_, ~1.5x the
        # ``rows.T @ S`` form) and on CUDA (~7x index_add_, whose atomics
        # collide on popular latents). S.T is built as CSR from one sort,
        # shared by the two products of a step (see _transposed_pattern).
        order, crow = _transposed_pattern(indices, n_out)
        tokens = torch.div(order, indices.shape[1], rounding_mode="floor")
        values = weights.reshape(-1).to(rows.dtype)[order]
        return _csr(crow, tokens, values, indices.shape[0]) @ rows
    # Accumulate low-precision dtypes in float32: index_add_ adds in the
    # destination dtype, and bf16 sums of ~B*k/n_out terms lose precision.
    acc_dtype = torch.float32 if rows.element_size() < 4 else rows.dtype
    out = torch.zeros(n_out, rows.shape[1], dtype=acc_dtype, device=rows.device)
    step = _fallback_chunk_rows(indices.shape[1], rows.shape[1], rows.device)
    for s in range(0, indices.shape[0], step):
        e = s + step
        # [c, k, d] products, one row of `rows` per active latent.
        src = rows[s:e, None, :].to(acc_dtype) * weights[s:e, :, None].to(acc_dtype)
        out.index_add_(0, indices[s:e].reshape(-1), src.reshape(-1, rows.shape[1]))
    return out.to(rows.dtype)


def _gather_rows(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t,j] * table[indices[t,j]]``.

    This is ``S @ table`` for the token-by-latent sparse matrix ``S``.

    Args:
        indices: ``[B, k]`` int64, sorted and distinct within each row.
        weights: ``[B, k]``.
        table: ``[n, d]``, may be a non-contiguous (transposed) view.

    Returns:
        ``[B, d]``, dtype of ``table``.
    """
    # Both branches want a row-major table: embedding_bag's strided path is
    # ~25x slower on CPU, and cuSPARSE with a column-major operand was ~4x
    # slower than a transposing copy followed by the row-major product.
    table = table.contiguous()
    use_spmm = _spmm_ok(table.dtype, table.device) and (_BACKEND == "csr" or table.device.type != "cpu")
    if use_spmm:
        # cuSPARSE spmm beat embedding_bag ~3x on an H200.
        csr = _token_csr(indices, weights.to(table.dtype), table.shape[0])
        return csr @ table
    # On CPU embedding_bag was ~15% faster than MKL's spmm (and it runs for
    # every dtype).
    return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def _sampled_dots(indices: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = <rows[t], table[indices[t, j]]>``.

    This is ``rows @ table.T`` sampled at the active entries, i.e. the
    gradient w.r.t. the sparse values of ``S @ table``.

    Args:
        indices: ``[B, k]`` int64, sorted and distinct within each row.
        rows: ``[B, d]``.
        table: ``[n, d]``.

    Returns:
        ``[B, k]``, dtype of ``rows``.
    """
    table = table.to(rows.dtype)
    sddmm = _BACKEND != "index" and rows.dtype in _SDDMM_DTYPES
    if _BACKEND == "auto":
        # MKL's SDDMM was ~6x faster than gather + bmm on CPU; on CUDA the
        # gather + bmm below was ~3.5x faster than cuSPARSE's SDDMM.
        sddmm = sddmm and rows.device.type == "cpu"
    if sddmm:
        pattern = _token_csr(
            indices,
            torch.zeros(indices.shape, dtype=rows.dtype, device=rows.device),
            table.shape[0],
        )
        # beta=0 ignores the pattern's values; only its sparsity is used.
        out = torch.sparse.sampled_addmm(pattern, rows, table.T, beta=0.0)
        return out.values().view(indices.shape)
    out = torch.empty(indices.shape, dtype=rows.dtype, device=rows.device)
    step = _fallback_chunk_rows(indices.shape[1], rows.shape[1], rows.device)
    for s in range(0, indices.shape[0], step):
        e = s + step
        gathered = table[indices[s:e]]  # [c, k, d]
        out[s:e] = torch.bmm(gathered, rows[s:e, :, None]).squeeze(-1)
    return out


def _prefilter_group_size(d_sae: int, k: int) -> int | None:
    """Group size for :func:`_topk_rows`, or ``None`` when plain topk is better.

    The selection costs ~``d_sae`` (group maxima) + ``d_sae / g`` (first topk)
    + ``k * g`` (second topk) per row, minimised near ``g = sqrt(d_sae / k)``;
    a power of two dividing ``d_sae`` is used. With ``k * g`` not well below
    ``d_sae`` there is nothing to gain.
    """
    g = 1
    while (g * 2) ** 2 <= d_sae // max(1, k) and d_sae % (g * 2) == 0:
        g *= 2
    if g < 4 or k * g * 4 > d_sae:
        return None
    return g


def _topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact row-wise ``topk(pre, k, sorted=False)`` for ``pre [n, d_sae]``.

    ``torch.topk`` over wide rows is a large share of the encoder forward
    (about half of the ``addmm`` time on CPU). This selects in two stages:
    split each row into ``d_sae / g`` strided groups ``{j, j + d_sae/g, ...}``
    of ``g`` latents, take the ``k`` groups with the largest maxima, and run
    topk over only their ``k * g`` members. Exact: if ``tau`` is the k-th
    largest group maximum, those ``k`` maxima are ``k`` distinct entries
    ``>= tau``, so every top-``k`` entry is ``>= tau`` and lies in a chosen
    group (among entries tied at ``tau`` the pick is arbitrary, as in topk).
    Strided rather than contiguous groups make the group maxima an
    element-wise max of ``g`` contiguous rows, which vectorises well.

    Returns:
        ``(values [n, k], indices [n, k] int64)``, in no particular order.
    """
    n, d_sae = pre.shape
    g = _prefilter_group_size(d_sae, k) if _TOPK_PREFILTER.get(pre.device.type, False) else None
    if g is None:
        return torch.topk(pre, k, dim=-1, sorted=False)
    n_groups = d_sae // g
    # pre3[r, a, c] = pre[r, a * n_groups + c]; group c is column c.
    pre3 = pre.view(n, g, n_groups)
    top_groups = pre3.amax(dim=1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    cand = pre3.gather(2, top_groups[:, None, :].expand(n, g, k))  # [n, g, k]
    values, flat = cand.reshape(n, g * k).topk(k, dim=-1, sorted=False)
    # Position (a, j) in cand is latent a * n_groups + top_groups[j].
    indices = (flat // k) * n_groups + top_groups.gather(1, flat % k)
    return values, indices


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
            values[s:e], indices[s:e] = _topk_rows(pre, k)
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
            buffer (~4M elements on CPU, ~134M elsewhere).

    Returns:
        ``(values [..., k], indices [..., k] int64)``. Indices are sorted
        ascending within each row (not by activation size); they are distinct,
        so the pair can be fed straight to :func:`sparse_decode`.
    """
    check_encoder_inputs(sae_in, W_enc, b_enc, k, chunk_rows)
    d_in = W_enc.shape[0]
    lead = sae_in.shape[:-1]
    sae_in, W_enc, b_enc = autocast_inputs(sae_in, W_enc, b_enc)
    with autocast_off(sae_in.device):
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
    values, W_dec = autocast_inputs(values, W_dec)
    with autocast_off(values.device):
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
