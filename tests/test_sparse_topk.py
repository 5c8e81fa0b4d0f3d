"""Tests for the sparse TopK kernels against the dense reference TopK SAE path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import sae_lens.kernels.sparse_topk as sparse_topk_module
from sae_lens.kernels import dense_from_sparse, sparse_decode, sparse_topk_encode

PARAM_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture
def prefilter_on_cpu() -> Iterator[None]:
    """Force the two-stage top-k selection on CPU (default there: off)."""
    old = dict(sparse_topk_module._TOPK_PREFILTER)
    sparse_topk_module._TOPK_PREFILTER["cpu"] = True
    yield
    sparse_topk_module._TOPK_PREFILTER.clear()
    sparse_topk_module._TOPK_PREFILTER.update(old)


@pytest.fixture(params=["auto", "csr", "index"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with each implementation of the sparse products."""
    old = sparse_topk_module._BACKEND
    sparse_topk_module._BACKEND = request.param
    yield request.param
    sparse_topk_module._BACKEND = old


def make_problem(
    B: int,
    d_in: int,
    d_sae: int,
    dtype: torch.dtype,
    seed: int = 0,
    b_enc_shift: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Random leaf tensors x [B, d_in], W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in], all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    p = {
        "x": leaf(B, d_in),
        "W_enc": leaf(d_in, d_sae),
        "b_enc": leaf(d_sae),
        "W_dec": leaf(d_sae, d_in),
        "b_dec": leaf(d_in),
    }
    with torch.no_grad():
        p["b_enc"] += b_enc_shift
    return p


def dense_reference(
    p: dict[str, torch.Tensor], k: int, indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd TopK SAE: returns (acts [B, d_sae], x_hat [B, d_in]).

    ``indices`` [B, k], if given, replaces the topk selection; low-precision
    tests use it so that rounding cannot change which latents are active.
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
    p: dict[str, torch.Tensor], k: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels under test: returns (values [B, k], indices [B, k], x_hat)."""
    values, indices = sparse_topk_encode(
        p["x"] - p["b_dec"], p["W_enc"], p["b_enc"], k, chunk_rows=chunk_rows
    )
    return values, indices, sparse_decode(values, indices, p["W_dec"], p["b_dec"])


def grads(out: torch.Tensor, p: dict[str, torch.Tensor], grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``<out, grad_out>`` w.r.t. x, W_enc, b_enc, W_dec, b_dec."""
    return torch.autograd.grad(out, [p[n] for n in PARAM_NAMES], grad_out)


def assert_matches_dense(
    B: int,
    d_in: int,
    d_sae: int,
    k: int,
    dtype: torch.dtype,
    *,
    chunk_rows: int | None = None,
    b_enc_shift: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Forward values and all five gradients agree with the dense path.

    Returns the sparse values so callers can make extra checks.
    """
    # float64 is compared tightly; float32 loosely (the chunked addmm rounds
    # differently from the reference's single matmul).
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    p = make_problem(B, d_in, d_sae, dtype, seed=seed, b_enc_shift=b_enc_shift)
    values, indices, x_hat = sparse_path(p, k, chunk_rows)
    acts_ref, x_hat_ref = dense_reference(p, k)

    assert values.shape == indices.shape == (B, k)
    assert indices.dtype == torch.int64
    # Indices come back sorted ascending (and hence distinct) per row.
    assert bool((indices[:, 1:] > indices[:, :-1]).all())
    torch.testing.assert_close(dense_from_sparse(values, indices, d_sae), acts_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x_hat, x_hat_ref, atol=tol, rtol=tol)

    grad_out = torch.randn(B, d_in, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for name, got, want in zip(
        PARAM_NAMES, grads(x_hat, p, grad_out), grads(x_hat_ref, p, grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"grad of {name} differs")
    return values


@pytest.mark.parametrize(
    ("B", "d_in", "d_sae", "k"),
    [
        (37, 11, 50, 7),
        (64, 16, 96, 1),  # k = 1
        (9, 5, 12, 12),  # k = d_sae: every latent is "active"
        (1, 4, 8, 3),  # single token
    ],
)
def test_matches_dense_float64(backend: str, B: int, d_in: int, d_sae: int, k: int) -> None:
    assert_matches_dense(B, d_in, d_sae, k, torch.float64)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 1000])
def test_forward_chunking_matches_dense(backend: str, chunk_rows: int) -> None:
    # 37 is not a multiple of 5 or 16, so the ragged last chunk is covered.
    assert_matches_dense(37, 11, 50, 7, torch.float64, chunk_rows=chunk_rows)


def test_matches_dense_float32(backend: str) -> None:
    assert_matches_dense(128, 32, 256, 16, torch.float32, seed=3)


def test_negative_topk_preactivations_are_zeroed(backend: str) -> None:
    # With b_enc shifted down most pre-activations are negative, so many of the
    # top-k entries are <= 0: their values must be 0 and get no gradient,
    # while their indices are still reported.
    B, d_in, d_sae, k = 40, 6, 30, 8
    values = assert_matches_dense(B, d_in, d_sae, k, torch.float64, b_enc_shift=-4.0)
    n_zero = int((values == 0).sum())
    assert 0 < n_zero < values.numel()

    p = make_problem(B, d_in, d_sae, torch.float64, b_enc_shift=-4.0)
    _, indices, _ = sparse_path(p, k)
    pre = (p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    ref_idx = pre.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(indices, ref_idx)


def test_all_topk_negative_gives_zero_encoder_grads() -> None:
    p = make_problem(10, 4, 12, torch.float64, b_enc_shift=-100.0)
    values, _, x_hat = sparse_path(p, 3)
    assert bool((values == 0).all())
    g = grads(x_hat, p, torch.ones_like(x_hat))
    for name, grad in zip(PARAM_NAMES, g, strict=True):
        if name in ("W_enc", "b_enc"):
            assert bool((grad == 0).all()), name


def test_hand_computed_example(backend: str) -> None:
    # 2 tokens, d_in = 2, d_sae = 3, k = 1.
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    b_dec = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    W_enc = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    b_enc = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    W_dec = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    # sae_in = x - b_dec = [[0, 2], [2, -1]]
    # pre_0 = [0, 2] @ W_enc + b_enc = [0, 2, 2] + [0, .5, 0] = [0, 2.5, 2]  -> latent 1, 2.5
    # pre_1 = [2, -1] @ W_enc + b_enc = [2, -1, -3] + b_enc = [2, -.5, -3] -> latent 0, 2.0
    values, indices = sparse_topk_encode(x - b_dec, W_enc, b_enc, 1)
    assert indices.tolist() == [[1], [0]]
    assert values.tolist() == [[2.5], [2.0]]
    # x_hat_0 = 2.5 * W_dec[1] + b_dec = [0, 5] + [1, 0] = [1, 5]
    # x_hat_1 = 2.0 * W_dec[0] + b_dec = [2, 2] + [1, 0] = [3, 2]
    x_hat = sparse_decode(values, indices, W_dec, b_dec)
    assert x_hat.tolist() == [[1.0, 5.0], [3.0, 2.0]]

    # Loss L = sum(x_hat * c) with c = [[1, 1], [1, 0]], so dL/dx_hat = c.
    c = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
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


def test_gradcheck_encode(backend: str) -> None:
    gen = torch.Generator().manual_seed(5)
    sae_in = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    W_enc = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    b_enc = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)

    def values_only(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_topk_encode(a, w, b, 3, chunk_rows=4)[0]

    assert torch.autograd.gradcheck(values_only, (sae_in, W_enc, b_enc))


def test_gradcheck_decode(backend: str) -> None:
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    # Unsorted, distinct indices per row: decode must accept any order.
    indices = torch.stack([torch.randperm(7, generator=gen)[:3] for _ in range(5)])
    W_dec = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b_dec = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)

    def decode(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_decode(v, indices, w, b)

    assert torch.autograd.gradcheck(decode, (values, W_dec, b_dec))


def test_decode_unsorted_indices_match_dense(backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    B, k, d_sae, d_in = 20, 5, 40, 6
    values = torch.randn(B, k, dtype=torch.float64, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(B)])
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    b_dec = torch.randn(d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    grad_out = torch.randn(B, d_in, dtype=torch.float64, generator=gen)

    out = sparse_decode(values, indices, W_dec, b_dec)
    ref = dense_from_sparse(values, indices, d_sae) @ W_dec + b_dec
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (values, W_dec, b_dec), grad_out)
    want = torch.autograd.grad(ref, (values, W_dec, b_dec), grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_leading_dims_and_values_only_grad() -> None:
    p = make_problem(12, 5, 20, torch.float64)
    x3 = p["x"].view(3, 4, 5)
    values, indices = sparse_topk_encode(x3 - p["b_dec"], p["W_enc"], p["b_enc"], 4)
    assert values.shape == indices.shape == (3, 4, 4)
    x_hat = sparse_decode(values, indices, p["W_dec"], p["b_dec"])
    assert x_hat.shape == (3, 4, 5)
    assert dense_from_sparse(values, indices, 20).shape == (3, 4, 20)
    _, x_hat_ref = dense_reference(p, 4)
    torch.testing.assert_close(x_hat.view(12, 5), x_hat_ref)

    # Only W_enc needs a gradient (input without grad): the other branches
    # of backward are skipped and must not break.
    sae_in = (p["x"] - p["b_dec"]).detach()
    v, _ = sparse_topk_encode(sae_in, p["W_enc"], p["b_enc"].detach(), 4)
    (g,) = torch.autograd.grad(v.sum(), [p["W_enc"]])
    assert g.shape == p["W_enc"].shape and g.is_contiguous()


def test_backward_saves_no_dense_activations() -> None:
    # B > d_in, so only a [B, d_sae]-sized tensor could reach B * d_sae elements.
    B, d_in, d_sae, k = 64, 8, 128, 4
    p = make_problem(B, d_in, d_sae, torch.float32)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values, indices = sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], k)
        sparse_decode(values, indices, p["W_dec"], p["b_dec"])
    assert saved, "expected the custom functions to save tensors"
    assert max(s.numel() for s in saved) < B * d_sae


def test_bfloat16_fallback_close_to_float64() -> None:
    p64 = make_problem(32, 16, 64, torch.float64, seed=2)
    p16 = {n: t.detach().to(torch.bfloat16).requires_grad_() for n, t in p64.items()}
    # Same bf16-rounded numbers in both, and the reference reuses the sparse
    # path's support, since bf16 rounding can reorder near-tied latents.
    p64 = {n: t.detach().to(torch.float64).requires_grad_() for n, t in p16.items()}
    _, i16, out16 = sparse_path(p16, 8)
    _, out64 = dense_reference(p64, 8, indices=i16)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), out64, atol=0.3, rtol=0.05)
    g16 = grads(out16, p16, torch.ones_like(out16))
    g64 = grads(out64, p64, torch.ones_like(out64))
    for name, a, b in zip(PARAM_NAMES, g16, g64, strict=True):
        assert a.dtype == torch.bfloat16, name
        scale = b.abs().max().item() + 1.0
        assert (a.double() - b).abs().max().item() < 0.05 * scale, name


@pytest.mark.parametrize(
    ("n", "d_sae", "k"),
    [(50, 8192, 32), (7, 1024, 1), (9, 256, 16), (5, 100, 3), (4, 96, 24), (3, 12, 12)],
)
def test_topk_rows_matches_torch_topk(prefilter_on_cpu: None, n: int, d_sae: int, k: int) -> None:
    pre = torch.randn(n, d_sae, generator=torch.Generator().manual_seed(d_sae + k))
    values, indices = sparse_topk_module._topk_rows(pre, k)
    ref_values, ref_indices = pre.topk(k, dim=-1)
    assert torch.equal(indices.sort(dim=-1).values, ref_indices.sort(dim=-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert torch.equal(values.sort(dim=-1).values, ref_values.sort(dim=-1).values)


def test_topk_rows_with_ties_keeps_topk_values(prefilter_on_cpu: None) -> None:
    # Few distinct values, so many ties straddle the k-th largest: indices
    # may legitimately differ from torch.topk, the selected values may not.
    gen = torch.Generator().manual_seed(11)
    pre = torch.randint(-3, 4, (64, 1024), generator=gen).float()
    values, indices = sparse_topk_module._topk_rows(pre, 32)
    assert sparse_topk_module._prefilter_group_size(1024, 32) is not None
    assert torch.equal(pre.gather(1, indices), values)
    assert bool((indices.sort(dim=-1).values.diff(dim=-1) > 0).all())  # distinct
    ref_values = pre.topk(32, dim=-1).values
    assert torch.equal(values.sort(dim=-1).values, ref_values.sort(dim=-1).values)


def test_prefiltered_encoder_matches_dense(prefilter_on_cpu: None, backend: str) -> None:
    # d_sae / k = 64, so the two-stage selection is active (groups of 8).
    assert sparse_topk_module._prefilter_group_size(256, 4) is not None
    assert_matches_dense(48, 8, 256, 4, torch.float64, chunk_rows=20)
    assert_matches_dense(48, 8, 256, 4, torch.float64, b_enc_shift=-3.0)


def test_dense_from_sparse() -> None:
    values = torch.tensor([[2.0, 0.5], [1.0, 3.0]], requires_grad=True)
    indices = torch.tensor([[3, 0], [1, 2]])
    dense = dense_from_sparse(values, indices, 4)
    assert dense.tolist() == [[0.5, 0.0, 0.0, 2.0], [0.0, 1.0, 3.0, 0.0]]
    dense.backward(torch.arange(8.0).view(2, 4))
    assert values.grad is not None and values.grad.tolist() == [[3.0, 0.0], [5.0, 6.0]]


def test_input_validation() -> None:
    p = make_problem(4, 3, 6, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], 0)
    with pytest.raises(ValueError, match="k must be"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"], 7)
    with pytest.raises(ValueError, match="last dim"):
        sparse_topk_encode(p["x"][:, :2], p["W_enc"], p["b_enc"], 2)
    with pytest.raises(ValueError, match="b_enc"):
        sparse_topk_encode(p["x"], p["W_enc"], p["b_enc"][:5], 2)
    with pytest.raises(ValueError, match="dtype"):
        sparse_topk_encode(p["x"].double(), p["W_enc"], p["b_enc"], 2)
    with pytest.raises(ValueError, match="differ"):
        sparse_decode(torch.ones(4, 2), torch.zeros(4, 3, dtype=torch.long), p["W_dec"], p["b_dec"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(backend: str, dtype: torch.dtype) -> None:
    p_cpu = make_problem(256, 32, 512, torch.float64, seed=4)
    p_cuda = {n: t.detach().to("cuda", dtype).requires_grad_() for n, t in p_cpu.items()}
    # The reference sees the same rounded numbers, in float64 on the CPU.
    p_cpu = {n: t.detach().cpu().double().requires_grad_() for n, t in p_cuda.items()}
    _, indices, out = sparse_path(p_cuda, 16)
    _, ref = dense_reference(p_cpu, 16, indices=indices)
    atol, rtol = (1e-3, 1e-3) if dtype == torch.float32 else (0.5, 0.05)
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)
    grad_out = torch.randn(256, 32, dtype=torch.float64)
    got = grads(out, p_cuda, grad_out.to("cuda", dtype))
    want = grads(ref, p_cpu, grad_out)
    for name, g, w in zip(PARAM_NAMES, got, want, strict=True):
        scale = w.abs().max().item() + 1.0
        err = (g.double().cpu() - w).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 0.05) * scale, name


def test_transposed_pattern_is_shared_and_rebuilt_when_indices_change() -> None:
    """S.T @ rows for two weightings of one pattern (as the decoder and encoder backward do) uses
    one cached pattern; an in-place change of the indices, even at the same address, rebuilds it."""
    gen = torch.Generator().manual_seed(5)
    B, k, d_sae, d = 9, 3, 11, 4
    indices = torch.stack([torch.randperm(d_sae, generator=gen)[:k].sort().values for _ in range(B)])
    rows = torch.randn(B, d, dtype=torch.float64, generator=gen)

    def want(weights: torch.Tensor) -> torch.Tensor:
        return dense_from_sparse(weights, indices, d_sae).T @ rows

    first_weights, second_weights = (torch.randn(B, k, dtype=torch.float64, generator=gen) for _ in range(2))
    first = sparse_topk_module._scatter_rows(indices, first_weights, rows, d_sae)
    pattern = sparse_topk_module._transposed_pattern(indices, d_sae)
    second = sparse_topk_module._scatter_rows(indices, second_weights, rows, d_sae)
    assert sparse_topk_module._transposed_pattern(indices, d_sae) is pattern
    torch.testing.assert_close(first, want(first_weights))
    torch.testing.assert_close(second, want(second_weights))

    other = torch.stack([torch.randperm(d_sae, generator=gen)[:k].sort().values for _ in range(B)])
    indices.copy_(other)  # same memory, new contents
    assert sparse_topk_module._transposed_pattern(indices, d_sae) is not pattern
    torch.testing.assert_close(
        sparse_topk_module._scatter_rows(indices, first_weights, rows, d_sae), want(first_weights)
    )
