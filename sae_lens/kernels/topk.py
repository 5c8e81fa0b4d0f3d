"""The TopK SAE encoder with sparse output: ``relu(topk(sae_in @ W_enc + b_enc, k))`` as CSR.

Only the forward matmul is dense. It runs over row chunks, so the ``[n_tokens, d_sae]``
pre-activations never exist at once (each chunk stays in cache on CPU), and each chunk keeps
only its top-k entries. The backward pass runs over those entries only (see
:mod:`sae_lens.kernels.csr`).
"""

from __future__ import annotations

import torch

from sae_lens.kernels.csr import Backend, SparseLatents, SparsityPattern, choose_kernels, encoder_latents
from sae_lens.kernels.inputs import autocast_inputs, autocast_off, check_encoder_inputs, rows_per_chunk

__all__ = ["sparse_topk_encode"]


def prefilter_by_default(device: torch.device) -> bool:
    """Whether the two-stage top-k (:func:`_topk_rows`) is used when ``prefilter`` is ``None``.

    It was faster on both devices measured, a 2-core CPU and an H200 (docs/benchmarks.md).
    """
    return device.type in ("cpu", "cuda")


def _prefilter_group_size(d_sae: int, k: int) -> int | None:
    """Group size for :func:`_topk_rows`, or ``None`` when plain topk is better.

    The selection costs ~``d_sae`` (group maxima) + ``d_sae / g`` (first topk) + ``k * g``
    (second topk) per row, minimised near ``g = sqrt(d_sae / k)``; a power of two dividing
    ``d_sae`` is used. With ``k * g`` not well below ``d_sae`` there is nothing to gain.
    """
    g = 1
    while (g * 2) ** 2 <= d_sae // max(1, k) and d_sae % (g * 2) == 0:
        g *= 2
    if g < 4 or k * g * 4 > d_sae:
        return None
    return g


def _topk_rows(pre: torch.Tensor, k: int, prefilter: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact row-wise ``topk(pre, k, sorted=False)`` of ``pre [n, d_sae]``.

    ``torch.topk`` over wide rows costs about half the chunk's ``addmm``. With ``prefilter`` the
    selection has two stages: split each row into ``d_sae / g`` strided groups
    ``{j, j + d_sae/g, ...}`` of ``g`` latents, keep the ``k`` groups with the largest maxima,
    and run topk over only their ``k * g`` members. Exact: if ``tau`` is the k-th largest group
    maximum, those ``k`` maxima are ``k`` distinct entries ``>= tau``, so every top-``k`` entry is
    ``>= tau`` and lies in a kept group (among ties at ``tau`` the pick is arbitrary, as in topk).
    Strided groups make the group maxima an element-wise max of ``g`` contiguous slices, which
    vectorises.

    Returns:
        ``(values [n, k], indices [n, k] int64)``, in no particular order.
    """
    n, d_sae = pre.shape
    g = _prefilter_group_size(d_sae, k) if prefilter else None
    if g is None:
        return torch.topk(pre, k, dim=-1, sorted=False)
    n_groups = d_sae // g
    # pre3[r, a, c] = pre[r, a * n_groups + c]; group c is column c.
    pre3 = pre.view(n, g, n_groups)
    top_groups = pre3.amax(dim=1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = pre3.gather(2, top_groups[:, None, :].expand(n, g, k))  # [n, g, k]
    values, flat = candidates.reshape(n, g * k).topk(k, dim=-1, sorted=False)
    # Position (a, j) of the candidates is latent a * n_groups + top_groups[j].
    indices = (flat // k) * n_groups + top_groups.gather(1, flat % k)
    return values, indices


def _select_topk(
    sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, chunk_rows: int, prefilter: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations and latents of each token's top k, ``[n_tokens, k]`` each, latents ascending."""
    n_tokens, d_sae = sae_in.shape[0], W_enc.shape[1]
    values = sae_in.new_empty(n_tokens, k, dtype=W_enc.dtype)
    indices = torch.empty(n_tokens, k, dtype=torch.long, device=sae_in.device)
    bias = b_enc.to(W_enc.dtype)
    # One reused buffer: only [chunk_rows, d_sae] of the pre-activations is ever alive.
    buf = sae_in.new_empty(chunk_rows, d_sae, dtype=W_enc.dtype)
    for s in range(0, n_tokens, chunk_rows):
        e = min(n_tokens, s + chunk_rows)
        pre = torch.addmm(bias, sae_in[s:e], W_enc, out=buf[: e - s])
        values[s:e], indices[s:e] = _topk_rows(pre, k, prefilter)
    if k > 1:
        # CSR order within a token: ascending latent.
        indices, perm = indices.sort(dim=-1)
        values = values.gather(1, perm)
    return values, indices


def sparse_topk_encode(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    chunk_rows: int | None = None,
    backend: Backend = "auto",
    prefilter: bool | None = None,
) -> SparseLatents:
    """The ``k`` largest pre-activations ``sae_in @ W_enc + b_enc`` of each token, ReLU'd, as CSR.

    Entries among the top ``k`` whose pre-activation is ``<= 0`` keep their index, get value 0
    and no gradient. Only ``sae_in``, ``W_enc`` and a boolean ReLU mask are saved for backward,
    not the ``[n_tokens, d_sae]`` pre-activations.

    Args:
        sae_in: ``[n_tokens, d_in]`` encoder input (typically ``x - b_dec``); its gradient is
            computed only when it requires grad.
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.
        k: active latents per token, ``1 <= k <= d_sae``.
        chunk_rows: tokens per ``addmm`` + ``topk`` chunk; ``None`` bounds the transient
            ``[rows, d_sae]`` buffer (~4M elements on CPU, ~134M elsewhere).
        backend: which sparse kernels the backward uses (:data:`~sae_lens.kernels.Backend`).
        prefilter: use the exact two-stage top-k; ``None``: :func:`prefilter_by_default`.

    Returns:
        :class:`SparseLatents` with ``k`` entries per token, latents ascending within a token.
    """
    check_encoder_inputs(sae_in, W_enc, b_enc, k, chunk_rows)
    sae_in, W_enc, b_enc = autocast_inputs(sae_in, W_enc, b_enc)
    kernels = choose_kernels(backend, W_enc.dtype, W_enc.device)
    if prefilter is None:
        prefilter = prefilter_by_default(sae_in.device)
    rows = rows_per_chunk(chunk_rows, sae_in.shape[0], W_enc.shape[1], sae_in.device)
    with autocast_off(sae_in.device):
        with torch.no_grad():
            pre_values, indices = _select_topk(sae_in, W_enc, b_enc, k, rows, prefilter)
        pattern = SparsityPattern.fixed_rows(indices, W_enc.shape[1])
        return encoder_latents(pre_values.view(-1), pattern, sae_in, W_enc, b_enc, kernels)
