"""Sparse BatchTopK SAE training kernels written in plain PyTorch.

A BatchTopK SAE keeps the ``K = k * B`` largest pre-activations of the whole batch rather than the
``k`` largest of each token::

    pre   = (x - b_dec) @ W_enc + b_enc                # [B, d_sae]
    acts  = relu(pre * (pre is among the K largest))   # mean k active latents per token
    x_hat = acts @ W_dec + b_dec

so tokens hold variable numbers of latents. The activations are kept as a CSR-like
:class:`BatchTopKActs` (``values``, latent ``indices``, per-token ``offsets``, and the ``rows``
each entry belongs to), sorted by token and, within a token, by latent index. As in
:mod:`sae_lens.kernels.sparse_topk`, only the encoder forward matmul is dense: the decode, the
decoder gradients and the encoder backward run over the ``K`` kept entries only.

Selecting the batch top-K without a huge ``topk``
--------------------------------------------------
``torch.topk`` over the flattened ``B * d_sae`` pre-activations runs on one thread and is slower
than the encoder matmul itself on CPU (``B=4096, d_sae=8192``: ~1.5 s vs ~0.5-1 s). Instead the
forward streams over row chunks (each chunk's ``[rows, d_sae]`` pre-activations stay in cache and
the full matrix is never materialised) and keeps only *candidates* above a lower bound:

1. the bound starts from a random sample of the first chunk, at a rank chosen so that about
   1.25 K entries of the batch are expected above it (exchangeable rows assumed, i.e. a shuffled
   activation buffer);
2. whenever the candidates exceed ``4 K`` the bound is raised to the K-th largest candidate
   (then at least K entries of the batch are provably above it), bounding memory;
3. the K-th largest of the ~1.25 K candidates (one small ``topk``) gives the exact cut; the
   candidates are filtered by it in place, so they stay in ascending flat-index order, which is
   already the CSR order (no sort). If fewer than K candidates survived an estimated bound
   (rows far from exchangeable), the selection is redone from bound 0 with the pruning of
   step 2, which is exact but slower.

The bound never affects the result, only speed: the output is always the exact batch top-K
restricted to positive pre-activations (non-positive entries would be zeroed by the ReLU and get
no gradient, so they are dropped instead of stored). Of entries tied at the K-th value, the first
in (token, latent) order are kept.

The MKL / cuSPARSE CSR kernels are used where they support the dtype (CPU: float32 / float64);
other dtypes use an ``embedding_bag`` / ``index_add_`` / gather fallback (``_BACKEND`` forces
either path).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sae_lens.kernels.inputs import autocast_inputs, autocast_off, check_encoder_inputs

# Chunk budgets and the dtypes the sparse products support are the same as for TopK.
from sae_lens.kernels.sparse_topk import (
    _CHUNK_ELEMS_ACCEL,
    _CHUNK_ELEMS_CPU,
    _SDDMM_DTYPES,
    _SPMM_DTYPES,
    _csr,
    _transposed_pattern,
)

__all__ = [
    "BatchTopKActs",
    "batchtopk_dense_from_sparse",
    "sparse_batchtopk_encode",
    "sparse_csr_decode",
]

# Which implementation of the sparse products to use: "auto" (CSR kernels where the backend has
# them for the dtype, else the index fallback) or "index" (always the fallback). Tests set this.
_BACKEND: Literal["auto", "index"] = "auto"

# Element budget of the [entries, d] temporaries of the index fallback.
_FALLBACK_CHUNK_ELEMS = 1 << 22

# How grad_W_enc / grad_W_dec build S.T: "sort" (own (latent, token) sort) or "torch" (csr.t()).
_TRANSPOSE: Literal["sort", "torch"] = "sort"

# Candidates kept above the bound are pruned back to the top K once they exceed this many K.
_PRUNE_FACTOR = 4
# Size of the random sample of the first chunk used to place the initial bound.
_SAMPLE_SIZE = 1 << 16


class BatchTopKActs(NamedTuple):
    """Sparse activations of a batch in CSR order (by token, then by latent index)."""

    values: torch.Tensor
    """``[nnz]`` activations, all > 0; differentiable."""
    indices: torch.Tensor
    """``[nnz]`` int64 latent index of each entry, ascending within a token."""
    offsets: torch.Tensor
    """``[n_tokens + 1]`` int64: token ``t`` owns entries ``offsets[t]:offsets[t + 1]``."""
    rows: torch.Tensor
    """``[nnz]`` int64 token of each entry (non-decreasing)."""

    @property
    def n_tokens(self) -> int:
        return self.offsets.shape[0] - 1

    def subset(self, mask: torch.Tensor) -> BatchTopKActs:
        """The entries where ``mask [nnz]`` holds, still in CSR order (values stay differentiable)."""
        rows = self.rows[mask]
        counts = torch.bincount(rows, minlength=self.n_tokens)
        offsets = torch.zeros_like(self.offsets)
        torch.cumsum(counts, 0, out=offsets[1:])
        return BatchTopKActs(self.values[mask], self.indices[mask], offsets, rows)


# -- sparse products over variable-length rows ----------------------------------------------------


def _spmm_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``csr @ dense`` / ``csr.t() @ dense`` should be used for this dtype/device."""
    return _BACKEND != "index" and dtype in _SPMM_DTYPES.get(device.type, ())


def _sddmm_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch.sparse.sampled_addmm`` should be used for this dtype/device."""
    return _BACKEND != "index" and device.type in _SPMM_DTYPES and dtype in _SDDMM_DTYPES


def _chunk(nnz_width: int) -> int:
    """Entries per chunk so that an ``[entries, width]`` temporary stays small."""
    return max(1, _FALLBACK_CHUNK_ELEMS // max(1, nnz_width))


def _gather_rows(acts: BatchTopKActs, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_{e in token t} weights[e] * table[indices[e]]``, ``[n_tokens, d]``."""
    if _spmm_ok(table.dtype, table.device):
        return _csr(acts.offsets, acts.indices, weights.to(table.dtype), table.shape[0]) @ table
    return F.embedding_bag(
        acts.indices,
        table.contiguous(),
        acts.offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
        include_last_offset=True,
    )


def _transposed_csr(acts: BatchTopKActs, weights: torch.Tensor, n_out: int) -> torch.Tensor:
    """The CSR matrix ``S.T [n_out, n_tokens]``, from the entries sorted by latent.

    The entries come in token order, so a stable sort by latent gives (latent, token) order; the
    sort is shared with sparse_topk and cached for the step's second product. Measured against
    ``csr.t() @ dense`` (which converts the CSC view itself) at B=4096, d_sae=8192, k=32: equal on
    one thread, faster on two.
    """
    order, crow = _transposed_pattern(acts.indices, n_out)
    return _csr(crow, acts.rows[order], weights[order], acts.n_tokens)


def _scatter_rows(acts: BatchTopKActs, weights: torch.Tensor, rows: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[i] = sum_{e: indices[e] == i} weights[e] * rows[token of e]``, ``[n_out, d]`` contiguous."""
    if _spmm_ok(rows.dtype, rows.device):
        if _TRANSPOSE == "sort":
            return _transposed_csr(acts, weights.to(rows.dtype), n_out) @ rows
        csr = _csr(acts.offsets, acts.indices, weights.to(rows.dtype), n_out)
        return (csr.t() @ rows).contiguous()
    acc_dtype = torch.float32 if rows.element_size() < 4 else rows.dtype
    out = torch.zeros(n_out, rows.shape[1], dtype=acc_dtype, device=rows.device)
    step = _chunk(rows.shape[1])
    for s in range(0, acts.indices.shape[0], step):
        src = rows[acts.rows[s : s + step]].to(acc_dtype) * weights[s : s + step, None].to(acc_dtype)
        out.index_add_(0, acts.indices[s : s + step], src)
    return out.to(rows.dtype)


def _sampled_dots(acts: BatchTopKActs, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[e] = <rows[token of e], table[indices[e]]>``, ``[nnz]`` (``rows @ table.T`` sampled)."""
    if _sddmm_ok(rows.dtype, rows.device) and table.dtype == rows.dtype:
        pattern = _csr(
            acts.offsets, acts.indices, torch.zeros_like(acts.indices, dtype=rows.dtype), table.shape[0]
        )
        return torch.sparse.sampled_addmm(pattern, rows, table.T, beta=0.0).values()
    out = torch.empty(acts.indices.shape[0], dtype=rows.dtype, device=rows.device)
    step = _chunk(rows.shape[1])
    for s in range(0, acts.indices.shape[0], step):
        a = rows[acts.rows[s : s + step]]
        b = table[acts.indices[s : s + step]].to(rows.dtype)
        out[s : s + step] = (a * b).sum(dim=-1)
    return out


# -- selection ------------------------------------------------------------------------------------


def _nonzero_1d(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` of a contiguous 1-D bool tensor, ascending, ``[n_true]`` int64.

    The CPU ``nonzero`` costs ~10 ns per element; reading the mask as int64 words first skips
    the all-false groups of 8, which is ~10x faster when few entries are set.
    """
    n = mask.numel()
    if n % 8 or not mask.is_contiguous() or mask.storage_offset() % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8)[words].nonzero()
    return words[hits[:, 0]] * 8 + hits[:, 1]


def _initial_bound(pre: torch.Tensor, fraction: float) -> float:
    """A bound with about ``1.25 * fraction`` of ``pre``'s entries above it, from a random sample.

    Returns 0 when the sample cannot place it (the caller then keeps every positive entry).
    """
    n = pre.numel()
    m = min(n, _SAMPLE_SIZE)
    gen = torch.Generator(device=pre.device).manual_seed(0)
    sample = pre[torch.randint(0, n, (m,), generator=gen, device=pre.device)] if m < n else pre
    expected = fraction * m
    rank = int(1.25 * expected + 4 * math.sqrt(expected) + 8)
    if rank >= m:
        return 0.0
    return max(0.0, float(sample.topk(rank, sorted=False).values.min()))


def _nextafter_down(value: torch.Tensor) -> float:
    """The largest float below ``value`` (so ``pre > result`` is ``pre >= value``)."""
    return float(torch.nextafter(value, torch.tensor(-math.inf, dtype=value.dtype, device=value.device)))


def _select(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    K: int,
    chunk_rows: int,
    estimate: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat indices (ascending, so already in CSR order) and values of the K largest positive
    pre-activations.

    Streams over row chunks keeping the entries above a lower bound (see the module docstring).
    With ``estimate`` the bound starts from a sample; if that left fewer than K candidates while
    more positive entries may exist, returns None (the caller retries without the estimate).
    """
    n_tokens = sae_in.shape[0]
    d_sae = W_enc.shape[1]
    b = b_enc.to(W_enc.dtype)
    buf = torch.empty(chunk_rows, d_sae, dtype=W_enc.dtype, device=sae_in.device)
    bound = 0.0
    estimated = False  # whether `bound` is an estimate (not yet proven to have K entries above it)
    vals: list[torch.Tensor] = []
    idxs: list[torch.Tensor] = []
    n_cand = 0
    for s in range(0, n_tokens, chunk_rows):
        e = min(n_tokens, s + chunk_rows)
        pre = torch.addmm(b, sae_in[s:e], W_enc, out=buf[: e - s]).view(-1)
        if s == 0 and estimate:
            bound = _initial_bound(pre, K / (n_tokens * d_sae))
            estimated = bound > 0
        pos = _nonzero_1d(pre > bound)
        vals.append(pre[pos])
        idxs.append(pos + s * d_sae)
        n_cand += pos.shape[0]
        if n_cand > _PRUNE_FACTOR * K:
            # Raise the bound to the K-th largest candidate: K entries are now provably above it.
            v, i = torch.cat(vals), torch.cat(idxs)
            kth = v.topk(K, sorted=False).values.min()
            bound = max(bound, _nextafter_down(kth))
            keep = _nonzero_1d(v > bound)
            vals, idxs, n_cand = [v[keep]], [i[keep]], keep.shape[0]
            estimated = False
    v = torch.cat(vals)
    i = torch.cat(idxs)
    if v.shape[0] < K and estimated:
        return None
    if v.shape[0] > K:
        # Keep the K largest without losing the ascending order of `i`: everything above the K-th
        # value, then as many entries equal to it as fit (the first ones, if there are ties).
        kth = v.topk(K, sorted=False).values.min()
        above = v > kth
        tied = v == kth
        room = K - int(above.sum())
        keep = _nonzero_1d(above | (tied & (tied.cumsum(0) <= room)))
        v, i = v[keep], i[keep]
    return i, v


class _BatchTopKEncode(torch.autograd.Function):
    """Autograd function behind :func:`sparse_batchtopk_encode` (2-D inputs)."""

    @staticmethod
    def forward(
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        k: int,
        chunk_rows: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n_tokens = sae_in.shape[0]
        d_sae = W_enc.shape[1]
        if chunk_rows is None:
            budget = _CHUNK_ELEMS_CPU if sae_in.device.type == "cpu" else _CHUNK_ELEMS_ACCEL
            chunk_rows = max(1, budget // d_sae)
        chunk_rows = min(chunk_rows, max(1, n_tokens))
        K = min(k * n_tokens, n_tokens * d_sae)
        with torch.no_grad():
            selected = _select(sae_in, W_enc, b_enc, K, chunk_rows, estimate=True)
            if selected is None:
                selected = _select(sae_in, W_enc, b_enc, K, chunk_rows, estimate=False)
        assert selected is not None  # without an estimate the selection is always exact
        flat, values = selected
        rows = torch.div(flat, d_sae, rounding_mode="floor")
        indices = flat - rows * d_sae
        offsets = torch.zeros(n_tokens + 1, dtype=torch.long, device=sae_in.device)
        torch.cumsum(torch.bincount(rows, minlength=n_tokens), 0, out=offsets[1:])

        ctx.save_for_backward(sae_in, W_enc, indices, offsets, rows)
        ctx.d_sae = d_sae
        ctx.b_enc_dtype = b_enc.dtype
        ctx.mark_non_differentiable(indices, offsets, rows)
        return values, indices, offsets, rows

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_values: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, indices, offsets, rows = ctx.saved_tensors
        if grad_values is None:
            return None, None, None, None, None
        acts = BatchTopKActs(grad_values, indices, offsets, rows)
        grad_sae_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            # grad_sae_in[t] = sum_{e in t} g[e] * W_enc[:, indices[e]]
            grad_sae_in = _gather_rows(acts, grad_values, W_enc.T).to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            # grad_W_enc[:, i] = sum_{e: latent i} g[e] * sae_in[token of e]
            grad_W_enc = _scatter_rows(acts, grad_values, sae_in, ctx.d_sae).to(W_enc.dtype).T.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(ctx.d_sae, dtype=grad_values.dtype, device=grad_values.device)
            grad_b_enc = grad_b_enc.index_add_(0, indices, grad_values).to(ctx.b_enc_dtype)
        return grad_sae_in, grad_W_enc, grad_b_enc, None, None


class _CsrDecode(torch.autograd.Function):
    """``out[t] = sum_{e in t} values[e] * W_dec[indices[e]]`` (no bias)."""

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        rows: torch.Tensor,
        W_dec: torch.Tensor,
    ) -> torch.Tensor:
        acts = BatchTopKActs(values, indices, offsets, rows)
        out = _gather_rows(acts, values, W_dec)
        ctx.save_for_backward(values, indices, offsets, rows, W_dec)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, indices, offsets, rows, W_dec = ctx.saved_tensors
        acts = BatchTopKActs(values, indices, offsets, rows)
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_dots(acts, grad_out.to(W_dec.dtype), W_dec).to(values.dtype)
        if ctx.needs_input_grad[4]:
            grad_W_dec = _scatter_rows(acts, values, grad_out.to(W_dec.dtype), W_dec.shape[0])
        return grad_values, None, None, None, grad_W_dec


def sparse_batchtopk_encode(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    chunk_rows: int | None = None,
) -> BatchTopKActs:
    """BatchTopK encoder returning the kept latents in CSR form.

    Computes ``pre = sae_in @ W_enc + b_enc`` and keeps the ``k * n_tokens`` largest entries of the
    whole batch, dropping those that are not positive (the ReLU would zero them). Only ``sae_in``,
    ``W_enc`` and the index tensors are saved for backward; the backward pass touches only the
    kept entries (grad of ``W_enc`` at kept columns, ``b_enc`` by ``index_add``, ``sae_in`` by a
    sparse gather of ``W_enc`` columns).

    Args:
        sae_in: ``[n_tokens, d_in]`` encoder input (typically ``x - b_dec``).
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.
        k: mean active latents per token, ``1 <= k <= d_sae``.
        chunk_rows: tokens per ``addmm`` chunk of the forward; ``None`` bounds the transient
            ``[rows, d_sae]`` buffer (~4M elements on CPU, ~64M elsewhere).

    Returns:
        :class:`BatchTopKActs`; only ``values`` is differentiable.
    """
    if sae_in.ndim != 2:
        raise ValueError(f"sae_in must be [n_tokens, d_in], got shape {tuple(sae_in.shape)}")
    check_encoder_inputs(sae_in, W_enc, b_enc, k, chunk_rows)
    sae_in, W_enc, b_enc = autocast_inputs(sae_in, W_enc, b_enc)
    with autocast_off(sae_in.device):
        values, indices, offsets, rows = _BatchTopKEncode.apply(sae_in, W_enc, b_enc, k, chunk_rows)
    return BatchTopKActs(values, indices, offsets, rows)


def sparse_csr_decode(acts: BatchTopKActs, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    """``x_hat[t] = sum_{e in t} values[e] * W_dec[indices[e]] + b_dec``, ``[n_tokens, d_in]``.

    Differentiable w.r.t. ``acts.values``, ``W_dec`` and ``b_dec`` (``None``: no bias) without
    forming the dense activations; tokens with no entries decode to ``b_dec``.
    """
    values, W_dec = autocast_inputs(acts.values, W_dec)
    with autocast_off(values.device):
        out = _CsrDecode.apply(values, acts.indices, acts.offsets, acts.rows, W_dec)
    return out if b_dec is None else out + b_dec


def batchtopk_dense_from_sparse(acts: BatchTopKActs, d_sae: int) -> torch.Tensor:
    """Scatter into dense ``[n_tokens, d_sae]`` activations (for metrics; O(n_tokens * d_sae))."""
    out = torch.zeros(acts.n_tokens, d_sae, dtype=acts.values.dtype, device=acts.values.device)
    return out.index_put((acts.rows, acts.indices), acts.values)
