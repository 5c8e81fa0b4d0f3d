"""The sparse BatchTopK encoder (+ sparse decode) against the dense BatchTopK formulation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.kernels import Backend, SparseLatents, sparse_batchtopk_encode, sparse_decode
from sae_lens.kernels.batchtopk import _nonzero_1d, _select_batch_topk

F64 = torch.float64
BACKENDS: tuple[Backend, ...] = ("auto", "csr", "index")
PARAM_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")

Problem = dict[str, torch.Tensor]


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense BatchTopK of `pre` [B, d_sae]: the k * B largest entries of the batch, ReLU'd."""
    flat = pre.reshape(-1)
    values, positions = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, positions, values.relu()).view_as(pre)


def dense_reference(p: Problem, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd BatchTopK SAE: (acts [B, d_sae], x_hat [B, d_in])."""
    acts = batch_topk((p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"], k)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def sparse_path(
    p: Problem, k: int, *, backend: Backend = "auto", chunk_rows: int | None = None
) -> tuple[SparseLatents, torch.Tensor]:
    latents = sparse_batchtopk_encode(
        p["x"] - p["b_dec"], p["W_enc"], p["b_enc"], k, chunk_rows=chunk_rows, backend=backend
    )
    return latents, sparse_decode(latents, p["W_dec"], p["b_dec"], backend=backend)


def assert_csr_invariants(latents: SparseLatents, n_tokens: int) -> None:
    offsets = latents.offsets
    assert offsets.shape == (n_tokens + 1,) and int(offsets[0]) == 0
    nnz = latents.values.shape[0]
    assert int(offsets[-1]) == nnz == latents.indices.shape[0] == latents.rows.shape[0]
    counts = offsets.diff()
    assert torch.equal(
        latents.rows, torch.repeat_interleave(torch.arange(n_tokens, device=counts.device), counts)
    )
    # Within a token the latent indices ascend (sorted by token, then latent).
    key = latents.rows * 10**9 + latents.indices
    assert bool((key[1:] > key[:-1]).all())
    assert bool((latents.values > 0).all())


def assert_matches_dense(
    make_problem: Callable[..., Problem],
    grads: Callable[..., tuple[torch.Tensor, ...]],
    B: int,
    d_in: int,
    d_sae: int,
    k: int,
    *,
    dtype: torch.dtype = F64,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    shift: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> SparseLatents:
    tol = 1e-10 if dtype == F64 else 1e-4
    p = make_problem(B, d_in, d_sae, dtype, seed, shift, device)
    latents, x_hat = sparse_path(p, k, backend=backend, chunk_rows=chunk_rows)
    acts_ref, x_hat_ref = dense_reference(p, k)
    assert_csr_invariants(latents, B)
    assert latents.values.shape[0] == int((acts_ref > 0).sum())
    torch.testing.assert_close(latents.to_dense(), acts_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x_hat, x_hat_ref, atol=tol, rtol=tol)
    grad_out = torch.randn(B, d_in, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    for name, g, w in zip(PARAM_NAMES, grads(x_hat, p, grad_out), grads(x_hat_ref, p, grad_out), strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=f"grad of {name} differs")
    return latents


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend: Backend) -> None:
    # B=2, d_in=2, d_sae=4, k=1: the batch keeps K=2 entries, here both in token 0.
    x = torch.tensor([[4.0, 0.0], [2.0, -3.0]], dtype=F64, requires_grad=True)
    b_dec = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)
    W_enc = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]], dtype=F64, requires_grad=True)
    b_enc = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=F64, requires_grad=True)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -1.0]], dtype=F64, requires_grad=True)
    # sae_in = x - b_dec = [[3, 1], [1, -2]]
    # pre_0 = [3, 1, 6, -0.5], pre_1 = [1, -2, 2, 2.5]; the two largest overall are 6 and 3 (token 0).
    latents = sparse_batchtopk_encode(x - b_dec, W_enc, b_enc, 1, backend=backend)
    assert latents.values.tolist() == [3.0, 6.0]
    assert latents.indices.tolist() == [0, 2]
    assert latents.offsets.tolist() == [0, 2, 2]
    assert latents.rows.tolist() == [0, 0]
    # x_hat_0 = 3 * [1, 0] + 6 * [.5, .5] + b_dec = [7, 2]; token 1 has no latent: x_hat_1 = b_dec.
    x_hat = sparse_decode(latents, W_dec, b_dec, backend=backend)
    assert x_hat.tolist() == [[7.0, 2.0], [1.0, -1.0]]

    c = torch.tensor([[1.0, 2.0], [5.0, 7.0]], dtype=F64)
    (x_hat * c).sum().backward()
    # dL/dv(latent 0) = <c_0, W_dec[0]> = 1; dL/dv(latent 2) = <c_0, W_dec[2]> = 1.5.
    assert W_dec.grad is not None and W_dec.grad.tolist() == [[3.0, 6.0], [0, 0], [6.0, 12.0], [0, 0]]
    assert b_enc.grad is not None and b_enc.grad.tolist() == [1.0, 0.0, 1.5, 0.0]
    # grad W_enc[:, 0] = 1 * sae_in_0 = [3, 1]; grad W_enc[:, 2] = 1.5 * [3, 1].
    assert W_enc.grad is not None and W_enc.grad.tolist() == [[3.0, 0, 4.5, 0], [1.0, 0, 1.5, 0]]
    # grad sae_in_0 = 1 * W_enc[:, 0] + 1.5 * W_enc[:, 2] = [4, 0]; token 1 gets none.
    assert x.grad is not None and x.grad.tolist() == [[4.0, 0.0], [0.0, 0.0]]
    # grad b_dec = sum_t c_t - sum_t grad sae_in_t = [6, 9] - [4, 0].
    assert b_dec.grad is not None and b_dec.grad.tolist() == [2.0, 9.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("B", "d_in", "d_sae", "k"),
    [(37, 11, 50, 7), (64, 16, 96, 1), (9, 5, 12, 12), (1, 4, 8, 3), (16, 8, 128, 100)],
)
def test_matches_dense_float64(
    make_problem, grads, backend: Backend, B: int, d_in: int, d_sae: int, k: int
) -> None:
    assert_matches_dense(make_problem, grads, B, d_in, d_sae, k, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 1000])
def test_chunking_matches_dense(make_problem, grads, backend: Backend, chunk_rows: int) -> None:
    assert_matches_dense(make_problem, grads, 37, 11, 50, 7, backend=backend, chunk_rows=chunk_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_float32(make_problem, grads, backend: Backend) -> None:
    assert_matches_dense(make_problem, grads, 128, 32, 256, 16, dtype=torch.float32, backend=backend, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_encode_and_decode(backend: Backend) -> None:
    gen = torch.Generator().manual_seed(8)
    sae_in = torch.randn(6, 4, dtype=F64, generator=gen, requires_grad=True)
    W_enc = torch.randn(4, 9, dtype=F64, generator=gen, requires_grad=True)
    b_enc = torch.randn(9, dtype=F64, generator=gen, requires_grad=True)
    W_dec = torch.randn(9, 4, dtype=F64, generator=gen, requires_grad=True)

    def encode(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_batchtopk_encode(a, w, b, 3, chunk_rows=4, backend=backend).values

    def step(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
        latents = sparse_batchtopk_encode(a, w, b, 3, chunk_rows=4, backend=backend)
        return sparse_decode(latents, w_dec, None, backend=backend)

    assert torch.autograd.gradcheck(encode, (sae_in, W_enc, b_enc))
    assert torch.autograd.gradcheck(step, (sae_in, W_enc, b_enc, W_dec))


def test_tokens_get_variable_numbers_of_latents(make_problem, grads) -> None:
    latents = assert_matches_dense(make_problem, grads, 64, 16, 96, 4, seed=5)
    counts = latents.offsets.diff()
    assert int(counts.sum()) == 64 * 4
    assert int(counts.min()) != int(counts.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_drops_non_positive_entries(make_problem, grads, backend: Backend) -> None:
    # Most pre-activations are negative: fewer than k*B entries are positive, and only those stay.
    latents = assert_matches_dense(make_problem, grads, 40, 6, 30, 8, backend=backend, shift=-4.0)
    assert 0 < latents.values.shape[0] < 40 * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_gives_no_entries(make_problem, backend: Backend) -> None:
    p = make_problem(10, 4, 12, b_enc_shift=-100.0)
    latents, x_hat = sparse_path(p, 3, backend=backend)
    assert latents.values.shape[0] == 0 and latents.offsets.tolist() == [0] * 11
    torch.testing.assert_close(x_hat, p["b_dec"].expand(10, 4))
    grads = torch.autograd.grad(x_hat.sum(), [p["W_enc"], p["b_enc"], p["W_dec"]])
    assert all(bool((g == 0).all()) for g in grads)


def selection_matches_dense(
    sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, **kwargs
) -> None:
    """`_select_batch_topk` gives the dense BatchTopK's entries, in flat ascending order."""
    B = sae_in.shape[0]
    selected = _select_batch_topk(sae_in, W_enc, b_enc, k * B, **kwargs)
    assert selected is not None
    flat, values = selected
    dense = batch_topk(sae_in @ W_enc + b_enc, k).reshape(-1)
    assert torch.equal(flat, dense.nonzero().squeeze(1))
    torch.testing.assert_close(values, dense[flat])


def test_pruning_path(make_problem) -> None:
    # A tiny prune factor and sample force the "raise the bound" branch on every chunk.
    p = make_problem(50, 8, 64)
    args = ((p["x"] - p["b_dec"]).detach(), p["W_enc"].detach(), p["b_enc"].detach(), 3)
    for estimate in (True, False):
        selection_matches_dense(*args, chunk_rows=4, estimate=estimate, prune_factor=1, sample_size=4)


def test_estimate_fallback(make_problem, grads) -> None:
    # The first chunk's tokens are much larger than the rest, so the bound estimated from it
    # keeps too few candidates: the estimated selection gives up, the exact one is right.
    p = make_problem(40, 6, 32, seed=2)
    with torch.no_grad():
        p["x"][:4] *= 50
    args = ((p["x"] - p["b_dec"]).detach(), p["W_enc"].detach(), p["b_enc"].detach())
    assert _select_batch_topk(*args, 2 * 40, 4, estimate=True) is None
    selection_matches_dense(*args, 2, chunk_rows=4, estimate=False)
    latents, x_hat = sparse_path(p, 2, chunk_rows=4)
    acts_ref, x_hat_ref = dense_reference(p, 2)
    torch.testing.assert_close(latents.to_dense(), acts_ref)
    torch.testing.assert_close(x_hat, x_hat_ref)


@pytest.mark.parametrize("prune_factor", [4, 1])
def test_ties_keep_exactly_k_per_token_on_average(prune_factor: int) -> None:
    # Every token has the same pre-activations (W_enc = 0), so the K-th value is tied B times.
    B, d_sae, k = 10, 6, 2
    b_enc = torch.tensor([3.0, 1.0, 2.0, 2.0, -1.0, 0.5], dtype=F64)
    sae_in, W_enc = torch.randn(B, 3, dtype=F64), torch.zeros(3, d_sae, dtype=F64)
    for estimate in (True, False):
        selected = _select_batch_topk(
            sae_in, W_enc, b_enc, B * k, B, estimate=estimate, prune_factor=prune_factor
        )
        assert selected is not None
        # 3.0 ten times, then 10 of the 20 entries tied at 2.0: the first ones in flat order.
        flat, values = selected
        assert sorted(values.tolist()) == [2.0] * 10 + [3.0] * 10
        assert torch.equal(
            flat,
            torch.sort(
                torch.cat([torch.arange(B) * d_sae, torch.arange(5) * d_sae + 2, torch.arange(5) * d_sae + 3])
            ).values,
        )
    latents = sparse_batchtopk_encode(sae_in, W_enc, b_enc, k)
    assert_csr_invariants(latents, B)
    assert latents.values.shape[0] == B * k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_a_valid_top_k(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((64, 16), (16, 128), (128,)))
    W.requires_grad_()
    latents = sparse_batchtopk_encode(x, W, b, 4, chunk_rows=64)
    pre = torch.addmm(b, x, W.detach())  # the kernel's own arithmetic, so rounding agrees
    dense = latents.to_dense().detach()
    kept = dense != 0
    assert int(kept.sum()) == 64 * 4
    assert torch.equal(dense[kept], pre[kept])
    assert pre[kept].min() >= pre[~kept].max()
    (grad_W,) = torch.autograd.grad(latents.values.float().sum(), [W])
    want = x.float().T @ kept.float()
    torch.testing.assert_close(grad_W.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 64, 1001])
def test_nonzero_1d_matches_nonzero(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.9
    assert torch.equal(_nonzero_1d(mask), mask.nonzero().squeeze(1))
    assert torch.equal(_nonzero_1d(mask[1:]), mask[1:].nonzero().squeeze(1))


def test_rejects_bad_inputs(make_problem) -> None:
    p = make_problem(4, 3, 5)
    with pytest.raises(SAELensError, match="k must be"):
        sparse_batchtopk_encode(p["x"], p["W_enc"], p["b_enc"], 6)
    with pytest.raises(SAELensError, match=r"\[n_tokens, d_in\]"):
        sparse_batchtopk_encode(p["x"][None], p["W_enc"], p["b_enc"], 2)
    with pytest.raises(SAELensError, match="backend must be one of"):
        sparse_batchtopk_encode(p["x"], p["W_enc"], p["b_enc"], 2, backend="dense")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels (cuSPARSE) need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_dense_cuda(make_problem, grads, backend: Backend, dtype: torch.dtype) -> None:
    assert_matches_dense(make_problem, grads, 256, 32, 512, 8, dtype=dtype, backend=backend, device="cuda")
    assert_matches_dense(
        make_problem, grads, 37, 11, 50, 7, dtype=dtype, backend=backend, chunk_rows=5, device="cuda"
    )
