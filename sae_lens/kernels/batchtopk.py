"""The BatchTopK SAE encoder with sparse output: the batch's ``k * n_tokens`` largest positive
pre-activations ``sae_in @ W_enc + b_enc`` as CSR (tokens hold variable numbers of latents).

Selecting the batch top-K without a huge ``topk``
--------------------------------------------------
``torch.topk`` over all ``n_tokens * d_sae`` pre-activations runs on one thread and is slower
than the encoder matmul itself on CPU. Instead the forward streams over row chunks (each chunk's
pre-activations stay in cache and the full matrix never exists) and keeps only *candidates*
above a lower bound:

1. the bound starts from a random sample of the first chunk, at a rank chosen so that about
   1.25 K entries of the batch are expected above it (exchangeable rows assumed, i.e. a shuffled
   activation buffer);
2. whenever the candidates exceed ``prune_factor * K`` the bound is raised to the K-th largest
   candidate (then at least K entries of the batch are provably above it), bounding memory;
3. the K-th largest of the candidates (one small ``topk``) gives the exact cut; filtering by it
   keeps the candidates in ascending flat-index order, which is already CSR order (no sort). If
   fewer than K candidates survived an estimated bound (rows far from exchangeable), the
   selection is redone from bound 0 with the pruning of step 2, which is exact but slower.

The bound never changes the result, only the speed: the output is the exact batch top-K
restricted to positive pre-activations (the ReLU would zero the others and give them no
gradient, so they are dropped). Of entries tied at the K-th value, the first in (token, latent)
order are kept.
"""

from __future__ import annotations

import math

import torch

from sae_lens.kernels.csr import Backend, SparseLatents, SparsityPattern, choose_kernels, encoder_latents
from sae_lens.kernels.inputs import autocast_inputs, autocast_off, check_encoder_inputs, rows_per_chunk

__all__ = ["sparse_batchtopk_encode"]

# Candidates above the bound are pruned back to the top K once they exceed this many K.
_PRUNE_FACTOR = 4
# Size of the random sample of the first chunk that places the initial bound.
_SAMPLE_SIZE = 1 << 16


def _nonzero_1d(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` of a 1-D bool tensor, ascending, ``[n_true]`` int64.

    The CPU ``nonzero`` costs ~10 ns per element; reading the mask as int64 words first skips the
    all-false groups of 8, ~10x faster when few entries are set.
    """
    if mask.numel() % 8 or not mask.is_contiguous() or mask.storage_offset() % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8)[words].nonzero()
    return words[hits[:, 0]] * 8 + hits[:, 1]


def _initial_bound(pre: torch.Tensor, fraction: float, sample_size: int) -> float:
    """A bound with about ``1.25 * fraction`` of ``pre``'s entries above it, from a random sample.

    Returns 0 when the sample cannot place it (the caller then keeps every positive entry).
    """
    n = pre.numel()
    m = min(n, sample_size)
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


def _select_batch_topk(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    K: int,
    chunk_rows: int,
    *,
    estimate: bool,
    prune_factor: int = _PRUNE_FACTOR,
    sample_size: int = _SAMPLE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat indices ``token * d_sae + latent`` (ascending, so CSR order) and values of the ``K``
    largest positive pre-activations, ``[nnz]`` each.

    With ``estimate`` the bound starts from a sample (see the module docstring); if that left
    fewer than ``K`` candidates while more positive entries may exist, returns ``None`` and the
    caller retries without it.
    """
    n_tokens, d_sae = sae_in.shape[0], W_enc.shape[1]
    bias = b_enc.to(W_enc.dtype)
    buf = sae_in.new_empty(chunk_rows, d_sae, dtype=W_enc.dtype)
    bound = 0.0
    estimated = False  # whether `bound` is an estimate, not yet proven to have K entries above it
    vals: list[torch.Tensor] = []
    idxs: list[torch.Tensor] = []
    n_cand = 0
    for s in range(0, n_tokens, chunk_rows):
        e = min(n_tokens, s + chunk_rows)
        pre = torch.addmm(bias, sae_in[s:e], W_enc, out=buf[: e - s]).view(-1)
        if s == 0 and estimate:
            bound = _initial_bound(pre, K / (n_tokens * d_sae), sample_size)
            estimated = bound > 0
        pos = _nonzero_1d(pre > bound)
        vals.append(pre[pos])
        idxs.append(pos + s * d_sae)
        n_cand += pos.shape[0]
        if n_cand > prune_factor * K:
            # Raise the bound to the K-th largest candidate: K entries are now provably above it.
            v, i = torch.cat(vals), torch.cat(idxs)
            bound = max(bound, _nextafter_down(v.topk(K, sorted=False).values.min()))
            keep = _nonzero_1d(v > bound)
            vals, idxs, n_cand = [v[keep]], [i[keep]], keep.shape[0]
            estimated = False
    v, i = torch.cat(vals), torch.cat(idxs)
    if v.shape[0] < K and estimated:
        return None
    if v.shape[0] > K:
        # The K largest without losing the ascending order of `i`: everything above the K-th
        # value, then as many entries equal to it as fit (the first ones, if there are ties).
        kth = v.topk(K, sorted=False).values.min()
        above = v > kth
        tied = v == kth
        room = K - int(above.sum())
        keep = _nonzero_1d(above | (tied & (tied.cumsum(0) <= room)))
        v, i = v[keep], i[keep]
    return i, v


def sparse_batchtopk_encode(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    chunk_rows: int | None = None,
    backend: Backend = "auto",
) -> SparseLatents:
    """The ``k * n_tokens`` largest positive pre-activations ``sae_in @ W_enc + b_enc`` of the
    whole batch, as CSR; tokens hold variable numbers of latents.

    Only ``sae_in`` and ``W_enc`` are saved for backward (besides the pattern), and the backward
    pass touches only the kept entries.

    Args:
        sae_in: ``[n_tokens, d_in]`` encoder input (typically ``x - b_dec``); its gradient is
            computed only when it requires grad.
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.
        k: mean active latents per token, ``1 <= k <= d_sae``.
        chunk_rows: tokens per ``addmm`` chunk; ``None`` bounds the transient ``[rows, d_sae]``
            buffer (~4M elements on CPU, ~134M elsewhere).
        backend: which sparse kernels the backward uses (:data:`~sae_lens.kernels.Backend`).

    Returns:
        :class:`SparseLatents`, every value > 0.
    """
    check_encoder_inputs(sae_in, W_enc, b_enc, k, chunk_rows)
    sae_in, W_enc, b_enc = autocast_inputs(sae_in, W_enc, b_enc)
    kernels = choose_kernels(backend, W_enc.dtype, W_enc.device)
    n_tokens, d_sae = sae_in.shape[0], W_enc.shape[1]
    rows = rows_per_chunk(chunk_rows, n_tokens, d_sae, sae_in.device)
    K = min(k * n_tokens, n_tokens * d_sae)
    with autocast_off(sae_in.device):
        with torch.no_grad():
            selected = _select_batch_topk(sae_in, W_enc, b_enc, K, rows, estimate=True)
            if selected is None:
                selected = _select_batch_topk(sae_in, W_enc, b_enc, K, rows, estimate=False)
        assert selected is not None  # without an estimate the selection is always exact
        flat, pre_values = selected
        tokens = torch.div(flat, d_sae, rounding_mode="floor")
        pattern = SparsityPattern.from_entries(tokens, flat - tokens * d_sae, n_tokens, d_sae)
        return encoder_latents(pre_values, pattern, sae_in, W_enc, b_enc, kernels)
