"""Sparse latents in CSR form, and the products over them that a sparse SAE step needs.

A TopK-family SAE keeps few latents per token, so its activations are a sparse matrix
``S [n_tokens, d_sae]``, stored here as CSR (:class:`SparseLatents`). Every product touching ``S``
runs over its non-zero entries only:

* ``S @ table``: the decode forward, and the encoder input's gradient (``table = W_enc.T``);
* ``S.T @ per_token``: ``grad_W_dec`` (``per_token`` = gradient of x_hat) and ``grad_W_enc``
  (``per_token`` = encoder input);
* ``per_token @ table.T`` sampled at ``S``'s entries: the gradient of ``S``'s values.

``S.T`` wants the entries in latent-major order, one sort of the pattern. A step needs it twice
for the same pattern (decoder backward, then encoder backward), so it is computed on first use
and cached on the :class:`SparsityPattern` that the encoder's and the decoder's autograd nodes
share. Nothing is cached anywhere else, so any number of SAEs (or threads) can be in flight.

Which kernel runs each product is decided in :func:`choose_kernels` only; the timings behind
its choices are in ``docs/benchmarks.md`` ("Kernel design measurements").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sae_lens.errors import SAELensError
from sae_lens.kernels.inputs import autocast_inputs, autocast_off

__all__ = ["Backend", "SparseLatents", "SparsityPattern", "choose_kernels", "sparse_decode"]

Backend = Literal["auto", "csr", "index"]
"""``"csr"``: MKL / cuSPARSE sparse-matrix kernels wherever they support the dtype and device;
``"index"``: only ``embedding_bag`` / ``index_add_`` / gather + dot, which run everywhere;
``"auto"``: per product, whichever of the two measured faster on the device."""

# dtypes of the sparse x dense products (MKL has no half-precision kernels; cuSPARSE has them).
_SPMM_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
# dtypes of torch.sparse.sampled_addmm (no half precision on either backend).
_SDDMM_DTYPES = (torch.float32, torch.float64)

# Element budget of the [entries, d] temporaries of the gather + dot fallback: small on CPU to
# stay in cache, larger elsewhere to amortise kernel launches.
_FALLBACK_CHUNK_ELEMS_CPU = 1 << 22
_FALLBACK_CHUNK_ELEMS_ACCEL = 1 << 26


@dataclass(frozen=True)
class KernelChoice:
    """Which implementation each sparse product uses; made by :func:`choose_kernels` only."""

    spmm_gather: bool
    """``S @ table`` by a sparse-matrix kernel (else ``embedding_bag``)."""
    spmm_scatter: bool
    """``S.T @ per_token`` by a sparse-matrix kernel (else ``embedding_bag``), both latent-major."""
    sddmm: bool
    """Sampled ``per_token @ table.T`` by ``torch.sparse.sampled_addmm`` (else gather + dot)."""


def choose_kernels(backend: Backend, dtype: torch.dtype, device: torch.device) -> KernelChoice:
    """The implementation of each sparse product for ``backend``, ``dtype`` and ``device``.

    ``"auto"``, from measurements (docs/benchmarks.md): on CPU ``embedding_bag`` for both
    ``S @ table`` and ``S.T @ per_token`` (faster than MKL's spmm; the latter reads ``S.T`` from
    the pattern's cached latent-major order) and MKL's SDDMM; on CUDA cuSPARSE for both spmm
    products and gather + dot for the sampled one (faster than cuSPARSE's SDDMM). MKL has no
    half-precision SDDMM; computing it in float32 is still ~3x faster than gather + dot, so CPU
    half-precision inputs are upcast for it.
    """
    if backend not in get_args(Backend):
        raise SAELensError(f"backend must be one of {get_args(Backend)}, got {backend!r}")
    if backend == "index" or device.type not in _SPMM_DTYPES:
        return KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=False)
    on_cpu = device.type == "cpu"
    spmm = dtype in _SPMM_DTYPES[device.type]
    sddmm = dtype in _SDDMM_DTYPES or (on_cpu and dtype.is_floating_point)
    if backend == "csr":
        return KernelChoice(spmm_gather=spmm, spmm_scatter=spmm, sddmm=sddmm)
    return KernelChoice(
        spmm_gather=spmm and not on_cpu, spmm_scatter=spmm and not on_cpu, sddmm=sddmm and on_cpu
    )


def _row_pointer(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[n + 1]`` running counts of ``keys`` (in ``[0, n)``): the CSR row pointer of the entries
    once sorted by key."""
    pointer = torch.zeros(n + 1, dtype=torch.long, device=keys.device)
    torch.cumsum(torch.bincount(keys, minlength=n), 0, out=pointer[1:])
    return pointer


class SparsityPattern:
    """Where a batch's non-zero latents are: the index tensors of :class:`SparseLatents`
    (``indices``, ``offsets``, ``rows``, ``d_sae``), ``row_length`` (entries per token when it is
    the same for all, as for TopK, else ``None``), and the latent-major order once asked for.

    Immutable by contract: the order is cached on the object, so its tensors must not be changed
    in place.
    """

    __slots__ = ("_by_latent", "d_sae", "indices", "offsets", "row_length", "rows")

    def __init__(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        rows: torch.Tensor,
        d_sae: int,
        row_length: int | None = None,
    ) -> None:
        self.indices = indices
        self.offsets = offsets
        self.rows = rows
        self.d_sae = d_sae
        self.row_length = row_length
        self._by_latent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def fixed_rows(cls, indices: torch.Tensor, d_sae: int) -> SparsityPattern:
        """The pattern of ``indices [n_tokens, k]`` (sorted and distinct within each row)."""
        n_tokens, k = indices.shape
        device = indices.device
        offsets = torch.arange(0, n_tokens * k + 1, k, device=device)
        rows = torch.arange(n_tokens, device=device).repeat_interleave(k)
        return cls(indices.reshape(-1), offsets, rows, d_sae, row_length=k)

    @classmethod
    def from_entries(
        cls, rows: torch.Tensor, indices: torch.Tensor, n_tokens: int, d_sae: int
    ) -> SparsityPattern:
        """The pattern of entries sorted by (token, latent): ``rows`` and ``indices`` ``[nnz]``."""
        return cls(indices, _row_pointer(rows, n_tokens), rows, d_sae)

    @property
    def n_tokens(self) -> int:
        return self.offsets.shape[0] - 1

    def subset(self, mask: torch.Tensor) -> SparsityPattern:
        """The entries where ``mask [nnz]`` holds (a fresh pattern with its own cache)."""
        return SparsityPattern.from_entries(self.rows[mask], self.indices[mask], self.n_tokens, self.d_sae)

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``S.T`` as CSR: ``(order [nnz], crow [d_sae + 1], tokens [nnz])``.

        ``order`` lists the entries sorted by latent (ties in token order), ``crow`` is the row
        pointer of ``S.T`` and ``tokens`` its column indices (each sorted entry's token).
        Computed on the first call, then cached.
        """
        if self._by_latent is None:
            self._by_latent = self._sort_by_latent()
        return self._by_latent

    def _sort_by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The entries come in token order, so a stable sort by latent gives (latent, token)
        # order, which is S.T's CSR order. Cheaper than torch's CSC-to-CSR conversion.
        order = torch.argsort(self.indices, stable=True)
        return order, _row_pointer(self.indices, self.d_sae), self.rows[order]


class SparseLatents:
    """A batch's active latents as a CSR matrix ``[n_tokens, d_sae]`` (by token, then latent).

    Built by :func:`~sae_lens.kernels.sparse_topk_encode`,
    :func:`~sae_lens.kernels.sparse_batchtopk_encode` or :meth:`from_rows`; decoded by
    :func:`sparse_decode`. Only ``values`` carries gradients.
    """

    __slots__ = ("pattern", "values")

    def __init__(self, values: torch.Tensor, pattern: SparsityPattern) -> None:
        if values.shape != pattern.indices.shape:
            raise SAELensError(
                f"values {tuple(values.shape)} must match the pattern's {tuple(pattern.indices.shape)} entries"
            )
        self.values = values
        """``[nnz]`` activations, differentiable (> 0 from BatchTopK; TopK's are clamped at 0)."""
        self.pattern = pattern
        """Where the entries are; shared with the autograd nodes that need it."""

    @property
    def indices(self) -> torch.Tensor:
        """``[nnz]`` int64 latent of each entry, ascending and distinct within a token."""
        return self.pattern.indices

    @property
    def offsets(self) -> torch.Tensor:
        """``[n_tokens + 1]`` int64 CSR row pointer: token ``t`` owns ``offsets[t]:offsets[t + 1]``."""
        return self.pattern.offsets

    @property
    def rows(self) -> torch.Tensor:
        """``[nnz]`` int64 token of each entry (non-decreasing)."""
        return self.pattern.rows

    @property
    def n_tokens(self) -> int:
        return self.pattern.n_tokens

    @property
    def d_sae(self) -> int:
        """Width of the dictionary."""
        return self.pattern.d_sae

    @classmethod
    def from_rows(cls, values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> SparseLatents:
        """Latents from ``values`` / ``indices`` ``[n_tokens, k]``, distinct within a row, any order.

        Sorts each row by latent; differentiable w.r.t. ``values``.
        """
        if values.ndim != 2 or values.shape != indices.shape:
            raise SAELensError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [n_tokens, k]"
            )
        indices = indices.long()
        if indices.shape[1] > 1:
            indices, perm = indices.sort(dim=1)
            values = values.gather(1, perm)
        return cls(values.reshape(-1), SparsityPattern.fixed_rows(indices, d_sae))

    def subset(self, mask: torch.Tensor) -> SparseLatents:
        """The entries where ``mask [nnz]`` (bool) holds, still CSR; values stay differentiable."""
        return SparseLatents(self.values[mask], self.pattern.subset(mask))

    def to_sparse_coo(self) -> torch.Tensor:
        """A coalesced ``torch.sparse_coo`` ``[n_tokens, d_sae]`` with detached values (for stats)."""
        return torch.sparse_coo_tensor(
            torch.stack([self.rows, self.indices]),
            self.values.detach(),
            (self.n_tokens, self.d_sae),
            is_coalesced=True,
            check_invariants=False,
        )

    def to_dense(self) -> torch.Tensor:
        """``[n_tokens, d_sae]`` with zeros elsewhere; differentiable w.r.t. ``values``."""
        out = self.values.new_zeros(self.n_tokens, self.d_sae)
        return out.index_put((self.rows, self.indices), self.values)


# -- the sparse products --------------------------------------------------------------------------


def _consume_csr_beta_warning() -> None:
    # Torch warns once per process that CSR support is beta. Trigger that warning here, at
    # import, rather than wrapping every CSR construction in warnings.catch_warnings, which
    # mutates process-wide state and is not thread-safe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = torch.ones(1, dtype=torch.long)
        torch.sparse_csr_tensor(one - 1, one - 1, torch.ones(1), (1, 1), check_invariants=False)


_consume_csr_beta_warning()


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The CSR matrix ``[len(crow) - 1, n_cols]``; valid by construction, so not checked."""
    return torch.sparse_csr_tensor(crow, col, values, (crow.shape[0] - 1, n_cols), check_invariants=False)


def _fallback_step(width: int, device: torch.device) -> int:
    """Entries per chunk so that an ``[entries, width]`` temporary stays bounded."""
    budget = _FALLBACK_CHUNK_ELEMS_CPU if device.type == "cpu" else _FALLBACK_CHUNK_ELEMS_ACCEL
    return max(1, budget // max(1, width))


def gather_rows(
    pattern: SparsityPattern, weights: torch.Tensor, table: torch.Tensor, use_spmm: bool
) -> torch.Tensor:
    """``S @ table``: ``out[t] = sum_{e in t} weights[e] * table[indices[e]]``, ``[n_tokens, d]``.

    ``weights [nnz]``; ``table [d_sae, d]`` may be a transposed view. Dtype of ``table``.
    """
    # Both kernels want a row-major table: embedding_bag's strided path is ~25x slower on CPU,
    # and cuSPARSE with a column-major operand ~4x slower than copying first.
    table = table.contiguous()
    weights = weights.to(table.dtype)
    if use_spmm:
        return _csr(pattern.offsets, pattern.indices, weights, table.shape[0]) @ table
    return F.embedding_bag(
        pattern.indices,
        table,
        pattern.offsets,
        mode="sum",
        per_sample_weights=weights,
        include_last_offset=True,
    )


def scatter_rows(
    pattern: SparsityPattern, weights: torch.Tensor, per_token: torch.Tensor, use_spmm: bool
) -> torch.Tensor:
    """``S.T @ per_token``: ``out[i] = sum_{e: indices[e] == i} weights[e] * per_token[rows[e]]``.

    ``weights [nnz]``, ``per_token [n_tokens, d]``; returns ``[d_sae, d]`` contiguous, dtype of
    ``per_token``. Both kernels read ``S.T`` in latent-major order, from the pattern's cached sort.
    """
    order, crow, tokens = pattern.by_latent()
    weights = weights.to(per_token.dtype)[order]
    if use_spmm:
        return _csr(crow, tokens, weights, pattern.n_tokens) @ per_token
    # Each latent's output row is a weighted bag of token rows: no atomics, no [nnz, d] temporary.
    return F.embedding_bag(
        tokens, per_token.contiguous(), crow, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


def sampled_dots(
    pattern: SparsityPattern, per_token: torch.Tensor, table: torch.Tensor, use_sddmm: bool
) -> torch.Tensor:
    """``per_token @ table.T`` at ``S``'s entries: ``out[e] = <per_token[rows[e]], table[indices[e]]>``.

    ``per_token [n_tokens, d]``, ``table [d_sae, d]``; returns ``[nnz]``, dtype of ``per_token``.
    """
    nnz = pattern.indices.shape[0]
    if use_sddmm:
        # No half-precision SDDMM exists: those run in float32 (see choose_kernels).
        dtype = per_token.dtype if per_token.dtype in _SDDMM_DTYPES else torch.float32
        # beta=0: only the pattern's sparsity is used, not its values.
        shape = _csr(pattern.offsets, pattern.indices, per_token.new_zeros(nnz, dtype=dtype), table.shape[0])
        out = torch.sparse.sampled_addmm(shape, per_token.to(dtype), table.to(dtype).T, beta=0.0).values()
        return out.to(per_token.dtype)
    table = table.to(per_token.dtype)
    out = per_token.new_empty(nnz)
    d = per_token.shape[1]
    k = pattern.row_length
    if k is not None:
        # Equal-length rows: one batched matvec per token, reading each token's vector once.
        step = max(1, _fallback_step(d, per_token.device) // max(1, k))
        indices, out2d = pattern.indices.view(-1, k), out.view(-1, k)
        for s in range(0, pattern.n_tokens, step):
            gathered = table[indices[s : s + step]]  # [tokens, k, d]
            out2d[s : s + step] = torch.bmm(gathered, per_token[s : s + step, :, None]).squeeze(-1)
        return out
    step = _fallback_step(d, per_token.device)
    for s in range(0, nnz, step):
        a = per_token[pattern.rows[s : s + step]]
        out[s : s + step] = (a * table[pattern.indices[s : s + step]]).sum(dim=-1)
    return out


# -- the autograd functions -----------------------------------------------------------------------


class _EncoderValues(torch.autograd.Function):
    """ReLU of an encoder's selected pre-activations, with gradients over those entries only."""

    @staticmethod
    def forward(
        ctx: Any,
        selected_pre: torch.Tensor,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        pattern: SparsityPattern,
        kernels: KernelChoice,
    ) -> torch.Tensor:
        positive = selected_pre > 0
        ctx.save_for_backward(sae_in, W_enc, positive)
        ctx.pattern = pattern
        ctx.kernels = kernels
        ctx.b_enc_dtype = b_enc.dtype
        return selected_pre.clamp_min(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, positive = ctx.saved_tensors
        pattern: SparsityPattern = ctx.pattern
        kernels: KernelChoice = ctx.kernels
        # ReLU gradient: entries whose pre-activation was <= 0 get none.
        grad = grad_values * positive
        grad_sae_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[1]:
            # grad_sae_in[t] = sum_{e in t} grad[e] * W_enc[:, indices[e]]
            grad_sae_in = gather_rows(pattern, grad, W_enc.T, kernels.spmm_gather).to(sae_in.dtype)
        if ctx.needs_input_grad[2]:
            # grad_W_enc[:, i] = sum_{e: latent i} grad[e] * sae_in[rows[e]], built as [d_sae, d_in],
            # then copied into the parameter's layout (AccumulateGrad would make the same copy).
            grad_W_enc = scatter_rows(pattern, grad, sae_in, kernels.spmm_scatter)
            grad_W_enc = grad_W_enc.to(W_enc.dtype).T.contiguous()
        if ctx.needs_input_grad[3]:
            grad_b_enc = grad.new_zeros(pattern.d_sae).index_add_(0, pattern.indices, grad)
            grad_b_enc = grad_b_enc.to(ctx.b_enc_dtype)
        return None, grad_sae_in, grad_W_enc, grad_b_enc, None, None


def encoder_latents(
    selected_pre: torch.Tensor,
    pattern: SparsityPattern,
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    kernels: KernelChoice,
) -> SparseLatents:
    """The latents ``relu(selected_pre)`` of an encoder ``pre = sae_in @ W_enc + b_enc``.

    ``selected_pre [nnz]`` are the pre-activations at ``pattern``'s entries, computed without
    autograd. Gradients reach ``sae_in`` (only when it requires grad), ``W_enc`` and ``b_enc``
    through the selected entries only. Call with autocast off, inputs already cast.
    """
    values = _EncoderValues.apply(selected_pre, sae_in, W_enc, b_enc, pattern, kernels)
    return SparseLatents(values, pattern)


class _Decode(torch.autograd.Function):
    """``out[t] = sum_{e in t} values[e] * W_dec[indices[e]]`` (no bias)."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, W_dec: torch.Tensor, pattern: SparsityPattern, kernels: KernelChoice
    ) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        ctx.kernels = kernels
        return gather_rows(pattern, values, W_dec, kernels.spmm_gather)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        pattern: SparsityPattern = ctx.pattern
        kernels: KernelChoice = ctx.kernels
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            # d out[t] / d values[e] = W_dec[indices[e]]: grad_out @ W_dec.T at the entries.
            grad_values = sampled_dots(pattern, grad_out, W_dec, kernels.sddmm).to(values.dtype)
        if ctx.needs_input_grad[1]:
            # grad_W_dec[i] = sum_{e: latent i} values[e] * grad_out[rows[e]], the parameter's layout.
            grad_W_dec = scatter_rows(pattern, values, grad_out, kernels.spmm_scatter)
        return grad_values, grad_W_dec, None, None


def sparse_decode(
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``x_hat[t] = sum_{e in t} values[e] * W_dec[indices[e]] + b_dec``, ``[n_tokens, d_in]``.

    ``W_dec [d_sae, d_in]``; ``b_dec [d_in]`` or ``None`` (no bias). Differentiable w.r.t.
    ``latents.values``, ``W_dec`` and ``b_dec`` without forming dense activations; a token with
    no entries decodes to ``b_dec``. When ``latents`` came from an encoder, this backward and the
    encoder's share one latent-major sort, cached on ``latents.pattern``.
    """
    if W_dec.ndim != 2 or W_dec.shape[0] != latents.d_sae:
        raise SAELensError(f"W_dec must be [d_sae={latents.d_sae}, d_in], got shape {tuple(W_dec.shape)}")
    values, W_dec = autocast_inputs(latents.values, W_dec)
    with autocast_off(values.device):
        kernels = choose_kernels(backend, W_dec.dtype, W_dec.device)
        out = _Decode.apply(values, W_dec, latents.pattern, kernels)
    return out if b_dec is None else out + b_dec
