"""The sparse TopK encoder (+ sparse decode) against the dense TopK SAE formulation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.kernels import Backend, SparseLatents, sparse_decode, sparse_topk_encode
from sae_lens.kernels.topk import _prefilter_group_size, _topk_rows

F64 = torch.float64
BACKENDS: tuple[Backend, ...] = ("auto", "csr", "index")
PARAM_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")

Problem = dict[str, torch.Tensor]


def dense_reference(
    p: Problem, k: int, indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd TopK SAE: (acts [B, d_sae], x_hat [B, d_in]).

    `indices` [B, k], if given, replaces the topk selection; low-precision tests use it so that
    rounding cannot change which latents are active.
    """
    pre = (p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if indices is None:
        vals, idx = pre.topk(k, dim=-1)
    else:
        idx = indices.to(pre.device)
        vals = pre.gather(-1, idx)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return acts, acts @ p["W_dec"] + p["b_dec"]


def sparse_path(
    p: Problem,
    k: int,
    *,
    backend: Backend = "auto",
    prefilter: bool | None = None,
    chunk_rows: int | None = None,
) -> tuple[SparseLatents, torch.Tensor]:
    """The kernels under test: (latents, x_hat)."""
    latents = sparse_topk_encode(
        p["x"] - p["b_dec"],
        p["W_enc"],
        p["b_enc"],
        k,
        chunk_rows=chunk_rows,
        backend=backend,
        prefilter=prefilter,
    )
    return latents, sparse_decode(latents, p["W_dec"], p["b_dec"], backend=backend)


def assert_matches_dense(
    make_problem: Callable[..., Problem],
    grads: Callable[..., tuple[torch.Tensor, ...]],
    B: int,
    d_in: int,
    d_sae: int,
    k: int,
    dtype: torch.dtype = F64,
    *,
    backend: Backend = "auto",
    prefilter: bool | None = None,
    chunk_rows: int | None = None,
    b_enc_shift: float = 0.0,
    seed: int = 0,
) -> SparseLatents:
    """Forward values and all five gradients agree with the dense path; returns the latents."""
    # float64 is compared tightly; float32 loosely (the chunked addmm rounds differently).
    tol = 1e-10 if dtype == F64 else 1e-4
    p = make_problem(B, d_in, d_sae, dtype, seed=seed, b_enc_shift=b_enc_shift)
    latents, x_hat = sparse_path(p, k, backend=backend, prefilter=prefilter, chunk_rows=chunk_rows)
    acts_ref, x_hat_ref = dense_reference(p, k)

    assert latents.values.shape == latents.indices.shape == latents.rows.shape == (B * k,)
    assert latents.indices.dtype == latents.offsets.dtype == latents.rows.dtype == torch.int64
    assert latents.offsets.tolist() == list(range(0, B * k + 1, k))
    assert latents.rows.tolist() == [t for t in range(B) for _ in range(k)]
    assert latents.n_tokens == B and latents.d_sae == d_sae
    # Indices come back sorted ascending (and hence distinct) per token.
    indices = latents.indices.view(B, k)
    assert bool((indices[:, 1:] > indices[:, :-1]).all())
    torch.testing.assert_close(latents.to_dense(), acts_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x_hat, x_hat_ref, atol=tol, rtol=tol)

    grad_out = torch.randn(B, d_in, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for name, got, want in zip(
        PARAM_NAMES, grads(x_hat, p, grad_out), grads(x_hat_ref, p, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"grad of {name} differs")
    return latents


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize(
    ("B", "d_in", "d_sae", "k"),
    [
        (37, 11, 50, 7),
        (64, 16, 96, 1),  # k = 1
        (9, 5, 12, 12),  # k = d_sae: every latent is "active"
        (1, 4, 8, 3),  # single token
        (48, 8, 256, 4),  # d_sae / k = 64: the two-stage selection runs (groups of 8)
    ],
)
def test_matches_dense_float64(
    make_problem, grads, backend: Backend, prefilter: bool, B: int, d_in: int, d_sae: int, k: int
) -> None:
    assert_matches_dense(make_problem, grads, B, d_in, d_sae, k, backend=backend, prefilter=prefilter)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 1000])
def test_forward_chunking_matches_dense(make_problem, grads, backend: Backend, chunk_rows: int) -> None:
    # 37 is not a multiple of 5 or 16, so the ragged last chunk is covered.
    assert_matches_dense(make_problem, grads, 37, 11, 50, 7, backend=backend, chunk_rows=chunk_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_float32(make_problem, grads, backend: Backend) -> None:
    assert_matches_dense(make_problem, grads, 128, 32, 256, 16, torch.float32, backend=backend, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_topk_preactivations_are_zeroed(make_problem, grads, backend: Backend) -> None:
    # With b_enc shifted down most pre-activations are negative, so many of the top-k entries are
    # <= 0: their values must be 0 and get no gradient, while their indices are still reported.
    B, d_in, d_sae, k = 40, 6, 30, 8
    latents = assert_matches_dense(make_problem, grads, B, d_in, d_sae, k, backend=backend, b_enc_shift=-4.0)
    n_zero = int((latents.values == 0).sum())
    assert 0 < n_zero < latents.values.numel()

    p = make_problem(B, d_in, d_sae, b_enc_shift=-4.0)
    latents, _ = sparse_path(p, k, backend=backend)
    pre = (p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    ref_idx = pre.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(latents.indices.view(B, k), ref_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_topk_negative_gives_zero_encoder_grads(make_problem, grads, backend: Backend) -> None:
    p = make_problem(10, 4, 12, b_enc_shift=-100.0)
    latents, x_hat = sparse_path(p, 3, backend=backend)
    assert bool((latents.values == 0).all())
    for name, grad in zip(PARAM_NAMES, grads(x_hat, p, torch.ones_like(x_hat)), strict=True):
        if name in ("W_enc", "b_enc"):
            assert bool((grad == 0).all()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_example(backend: Backend) -> None:
    # 2 tokens, d_in = 2, d_sae = 3, k = 1.
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64, requires_grad=True)
    b_dec = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    W_enc = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]], dtype=F64, requires_grad=True)
    b_enc = torch.tensor([0.0, 0.5, 0.0], dtype=F64, requires_grad=True)
    W_dec = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0]], dtype=F64, requires_grad=True)
    # sae_in = x - b_dec = [[0, 2], [2, -1]]
    # pre_0 = [0, 2] @ W_enc + b_enc = [0, 2, 2] + [0, .5, 0] = [0, 2.5, 2]  -> latent 1, 2.5
    # pre_1 = [2, -1] @ W_enc + b_enc = [2, -1, -3] + b_enc = [2, -.5, -3] -> latent 0, 2.0
    latents = sparse_topk_encode(x - b_dec, W_enc, b_enc, 1, backend=backend)
    assert latents.indices.tolist() == [1, 0]
    assert latents.values.tolist() == [2.5, 2.0]
    # x_hat_0 = 2.5 * W_dec[1] + b_dec = [0, 5] + [1, 0] = [1, 5]
    # x_hat_1 = 2.0 * W_dec[0] + b_dec = [2, 2] + [1, 0] = [3, 2]
    x_hat = sparse_decode(latents, W_dec, b_dec, backend=backend)
    assert x_hat.tolist() == [[1.0, 5.0], [3.0, 2.0]]

    # Loss L = sum(x_hat * c) with c = [[1, 1], [1, 0]], so dL/dx_hat = c.
    c = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    (x_hat * c).sum().backward()
    # dL/dvalue_0 = <c_0, W_dec[1]> = <[1, 1], [0, 2]> = 2
    # dL/dvalue_1 = <c_1, W_dec[0]> = <[1, 0], [1, 1]> = 1   (both pre > 0: ReLU passes)
    # grad W_dec: row 1 = 2.5 * c_0 = [2.5, 2.5]; row 0 = 2 * c_1 = [2, 0]; row 2 unused.
    assert W_dec.grad is not None and W_dec.grad.tolist() == [[2.0, 0.0], [2.5, 2.5], [0.0, 0.0]]
    # grad b_enc: latent 0 gets 1 (token 1), latent 1 gets 2 (token 0).
    assert b_enc.grad is not None and b_enc.grad.tolist() == [1.0, 2.0, 0.0]
    # grad W_enc[:, 0] = 1 * sae_in_1 = [2, -1]; grad W_enc[:, 1] = 2 * sae_in_0 = [0, 4].
    assert W_enc.grad is not None
    assert W_enc.grad.tolist() == [[2.0, 0.0, 0.0], [-1.0, 4.0, 0.0]]
    # grad sae_in_0 = 2 * W_enc[:, 1] = [0, 2]; grad sae_in_1 = 1 * W_enc[:, 0] = [1, 0].
    assert x.grad is not None and x.grad.tolist() == [[0.0, 2.0], [1.0, 0.0]]
    # grad b_dec = sum_t c_t - sum_t grad sae_in_t = [2, 1] - [1, 2] = [1, -1].
    assert b_dec.grad is not None and b_dec.grad.tolist() == [1.0, -1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefilter", [True, False])
def test_gradcheck_encode(backend: Backend, prefilter: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    # d_sae / k = 64, so the prefilter is active when asked for.
    sae_in = torch.randn(6, 4, dtype=F64, generator=gen, requires_grad=True)
    W_enc = torch.randn(4, 128, dtype=F64, generator=gen, requires_grad=True)
    b_enc = torch.randn(128, dtype=F64, generator=gen, requires_grad=True)
    assert _prefilter_group_size(128, 2) is not None

    def values_only(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_topk_encode(a, w, b, 2, chunk_rows=4, backend=backend, prefilter=prefilter).values

    assert torch.autograd.gradcheck(values_only, (sae_in, W_enc, b_enc))


def test_inputs_must_be_2d_and_values_only_grad(make_problem) -> None:
    p = make_problem(12, 5, 20)
    with pytest.raises(SAELensError, match=r"\[n_tokens, d_in\]"):
        sparse_topk_encode(p["x"].view(3, 4, 5), p["W_enc"], p["b_enc"], 4)

    # Only W_enc needs a gradient (input without grad, as the SAEs call it): the other branches
    # of backward are skipped and must not break.
    sae_in = (p["x"] - p["b_dec"]).detach()
    latents = sparse_topk_encode(sae_in, p["W_enc"], p["b_enc"].detach(), 4)
    (g,) = torch.autograd.grad(latents.values.sum(), [p["W_enc"]])
    assert g.shape == p["W_enc"].shape and g.is_contiguous()
    pre = sae_in @ p["W_enc"].detach() + p["b_enc"].detach()
    chosen = torch.zeros_like(pre).scatter(-1, pre.topk(4, dim=-1).indices, 1.0) * (pre > 0)
    torch.testing.assert_close(g, sae_in.T @ chosen)


def test_backward_saves_no_dense_activations(make_problem) -> None:
    # B > d_in, so only a [B, d_sae]-sized tensor could reach B * d_sae elements.
    B, d_in, d_sae, k = 64, 8, 128, 4
    p = make_problem(B, d_in, d_sae, torch.float32)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        latents = sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], k)
        sparse_decode(latents, p["W_dec"], p["b_dec"])
    assert saved, "expected the custom functions to save tensors"
    assert max(s.numel() for s in saved) < B * d_sae


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_close_to_float64(make_problem, grads, backend: Backend) -> None:
    p64 = make_problem(32, 16, 64, seed=2)
    p16 = {n: t.detach().to(torch.bfloat16).requires_grad_() for n, t in p64.items()}
    # Same bf16-rounded numbers in both, and the reference reuses the sparse path's support,
    # since bf16 rounding can reorder near-tied latents.
    p64 = {n: t.detach().to(F64).requires_grad_() for n, t in p16.items()}
    latents, out16 = sparse_path(p16, 8, backend=backend)
    _, out64 = dense_reference(p64, 8, indices=latents.indices.view(32, 8))
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), out64, atol=0.3, rtol=0.05)
    g16 = grads(out16, p16, torch.ones_like(out16))
    g64 = grads(out64, p64, torch.ones_like(out64))
    for name, a, b in zip(PARAM_NAMES, g16, g64, strict=True):
        assert a.dtype == torch.bfloat16, name
        scale = b.abs().max().item() + 1.0
        assert (a.double() - b).abs().max().item() < 0.05 * scale, name


@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize(
    ("n", "d_sae", "k"),
    [(50, 8192, 32), (7, 1024, 1), (9, 256, 16), (5, 100, 3), (4, 96, 24), (3, 12, 12)],
)
def test_topk_rows_matches_torch_topk(prefilter: bool, n: int, d_sae: int, k: int) -> None:
    pre = torch.randn(n, d_sae, generator=torch.Generator().manual_seed(d_sae + k))
    values, indices = _topk_rows(pre, k, prefilter)
    ref_values, ref_indices = pre.topk(k, dim=-1)
    assert torch.equal(indices.sort(dim=-1).values, ref_indices.sort(dim=-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert torch.equal(values.sort(dim=-1).values, ref_values.sort(dim=-1).values)


def test_prefilter_group_sizes() -> None:
    # g = the largest power of two with g^2 <= d_sae / k dividing d_sae, if k * g * 4 <= d_sae.
    assert _prefilter_group_size(8192, 32) == 16
    assert _prefilter_group_size(256, 4) == 8
    assert _prefilter_group_size(1024, 32) == 4
    assert _prefilter_group_size(100, 3) == 4  # 100 // 3 = 33 >= 4^2; 3 * 4 * 4 <= 100
    assert _prefilter_group_size(8200, 32) == 8  # 16 would fit 8200 // 32, but does not divide 8200
    assert _prefilter_group_size(96, 24) is None  # g = 2: too small to pay off
    assert _prefilter_group_size(12, 12) is None


def test_topk_rows_with_ties_keeps_topk_values() -> None:
    # Few distinct values, so many ties straddle the k-th largest: indices may legitimately
    # differ from torch.topk, the selected values may not.
    gen = torch.Generator().manual_seed(11)
    pre = torch.randint(-3, 4, (64, 1024), generator=gen).float()
    values, indices = _topk_rows(pre, 32, prefilter=True)
    assert _prefilter_group_size(1024, 32) is not None
    assert torch.equal(pre.gather(1, indices), values)
    assert bool((indices.sort(dim=-1).values.diff(dim=-1) > 0).all())  # distinct
    ref_values = pre.topk(32, dim=-1).values
    assert torch.equal(values.sort(dim=-1).values, ref_values.sort(dim=-1).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefiltered_encoder_matches_dense(make_problem, grads, backend: Backend) -> None:
    # d_sae / k = 64, so the two-stage selection is active (groups of 8).
    assert _prefilter_group_size(256, 4) is not None
    for prefilter in (True, False):
        for extra in ({"chunk_rows": 20}, {"b_enc_shift": -3.0}):
            assert_matches_dense(
                make_problem, grads, 48, 8, 256, 4, backend=backend, prefilter=prefilter, **extra
            )


def test_input_validation(make_problem) -> None:
    p = make_problem(4, 3, 6, torch.float32)
    with pytest.raises(SAELensError, match="k must be"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], 0)
    with pytest.raises(SAELensError, match="k must be"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], 7)
    with pytest.raises(SAELensError, match="last dim"):
        sparse_topk_encode(p["x"][:, :2], p["W_enc"], p["b_enc"], 2)
    with pytest.raises(SAELensError, match="b_enc"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"][:5], 2)
    with pytest.raises(SAELensError, match="dtype"):
        sparse_topk_encode(p["x"].double(), p["W_enc"], p["b_enc"], 2)
    with pytest.raises(SAELensError, match="chunk_rows"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], 2, chunk_rows=0)
    with pytest.raises(SAELensError, match="backend must be one of"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], 2, backend="mkl")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels (cuSPARSE) need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(make_problem, grads, backend: Backend, dtype: torch.dtype) -> None:
    p_cpu = make_problem(256, 32, 512, seed=4)
    p_cuda = {n: t.detach().to("cuda", dtype).requires_grad_() for n, t in p_cpu.items()}
    # The reference sees the same rounded numbers, in float64 on the CPU.
    p_cpu = {n: t.detach().cpu().double().requires_grad_() for n, t in p_cuda.items()}
    latents, out = sparse_path(p_cuda, 16, backend=backend)
    _, ref = dense_reference(p_cpu, 16, indices=latents.indices.view(256, 16))
    atol, rtol = (1e-3, 1e-3) if dtype == torch.float32 else (0.5, 0.05)
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)
    grad_out = torch.randn(256, 32, dtype=F64)
    got = grads(out, p_cuda, grad_out.to("cuda", dtype))
    want = grads(ref, p_cpu, grad_out)
    for name, g, w in zip(PARAM_NAMES, got, want, strict=True):
        scale = w.abs().max().item() + 1.0
        err = (g.double().cpu() - w).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 0.05) * scale, name
