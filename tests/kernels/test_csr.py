"""SparseLatents, sparse_decode, the kernel choice, and the latent-major order shared per step."""

from __future__ import annotations

import threading

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.kernels import (
    Backend,
    SparseLatents,
    sparse_batchtopk_encode,
    sparse_decode,
    sparse_topk_encode,
)
from sae_lens.kernels.csr import KernelChoice, SparsityPattern, choose_kernels

F64 = torch.float64
BACKENDS: tuple[Backend, ...] = ("auto", "csr", "index")
ENCODERS = {"topk": sparse_topk_encode, "batchtopk": sparse_batchtopk_encode}
PARAM_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")

Problem = dict[str, torch.Tensor]


def random_rows(B: int, k: int, d_sae: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, k] (float64, requiring grad) and distinct, unsorted indices [B, k]."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(B, k, dtype=F64, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(B)])
    return values, indices


def variable_latents(seed: int = 0) -> SparseLatents:
    """7 tokens holding 0 to 4 latents each (d_sae 10), values requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(7, 10, dtype=F64, generator=gen)
    dense[torch.rand(7, 10, generator=gen) < 0.7] = 0
    dense[3] = 0  # a token with no latent
    rows, indices = dense.nonzero(as_tuple=True)
    pattern = SparsityPattern.from_entries(rows, indices, 7, 10)
    return SparseLatents(dense[rows, indices].clone().requires_grad_(), pattern)


# -- SparseLatents --------------------------------------------------------------------------------


def test_from_rows_sorts_each_row_and_keeps_gradients() -> None:
    values = torch.tensor([[2.0, 0.5], [1.0, 3.0]], requires_grad=True)
    latents = SparseLatents.from_rows(values, torch.tensor([[3, 0], [1, 2]]), 4)
    assert latents.indices.tolist() == [0, 3, 1, 2]
    assert latents.values.tolist() == [0.5, 2.0, 1.0, 3.0]
    assert latents.offsets.tolist() == [0, 2, 4] and latents.rows.tolist() == [0, 0, 1, 1]
    assert latents.n_tokens == 2 and latents.d_sae == 4
    # to_dense places each value at its latent and sends gradients back to the caller's order.
    dense = latents.to_dense()
    assert dense.tolist() == [[0.5, 0.0, 0.0, 2.0], [0.0, 1.0, 3.0, 0.0]]
    dense.backward(torch.arange(8.0).view(2, 4))
    assert values.grad is not None and values.grad.tolist() == [[3.0, 0.0], [5.0, 6.0]]


def test_from_rows_rejects_mismatched_shapes() -> None:
    with pytest.raises(SAELensError, match=r"\[n_tokens, k\]"):
        SparseLatents.from_rows(torch.ones(4, 2), torch.zeros(4, 3, dtype=torch.long), 6)
    with pytest.raises(SAELensError, match=r"\[n_tokens, k\]"):
        SparseLatents.from_rows(torch.ones(4), torch.zeros(4, dtype=torch.long), 6)


def test_subset_keeps_csr_and_gradients() -> None:
    latents = variable_latents()
    mask = latents.indices >= 5
    part = latents.subset(mask)
    dense = latents.to_dense().detach()
    want = dense * (torch.arange(10) >= 5)
    torch.testing.assert_close(part.to_dense(), want)
    assert part.offsets.tolist() == [0, *torch.cumsum((want != 0).sum(dim=1), 0).tolist()]
    assert torch.equal(part.rows, latents.rows[mask])
    assert part.pattern is not latents.pattern
    part.values.sum().backward()
    assert latents.values.grad is not None
    assert torch.equal(latents.values.grad, mask.to(F64))


def test_to_sparse_coo_is_coalesced_and_detached() -> None:
    latents = variable_latents()
    coo = latents.to_sparse_coo()
    assert coo.is_sparse and coo.is_coalesced() and not coo.requires_grad
    assert coo.shape == (7, 10)
    torch.testing.assert_close(coo.to_dense(), latents.to_dense().detach())
    # Already coalesced for real: coalescing again changes nothing.
    assert torch.equal(coo._indices(), coo.coalesce().indices())


def test_values_must_match_the_pattern() -> None:
    pattern = SparsityPattern.fixed_rows(torch.tensor([[0, 1], [1, 2]]), 3)
    with pytest.raises(SAELensError, match="values"):
        SparseLatents(torch.ones(3), pattern)


# -- sparse_decode --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_decode_fixed_rows(backend: Backend) -> None:
    values, indices = random_rows(5, 3, 7, seed=6)
    gen = torch.Generator().manual_seed(6)
    W_dec = torch.randn(7, 4, dtype=F64, generator=gen, requires_grad=True)
    b_dec = torch.randn(4, dtype=F64, generator=gen, requires_grad=True)

    def decode(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Unsorted indices: from_rows sorts them, differentiably.
        return sparse_decode(SparseLatents.from_rows(v, indices, 7), w, b, backend=backend)

    assert torch.autograd.gradcheck(decode, (values, W_dec, b_dec))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_decode_variable_rows(backend: Backend) -> None:
    latents = variable_latents(seed=1)
    W_dec = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def decode(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sparse_decode(SparseLatents(v, latents.pattern), w, None, backend=backend)

    assert torch.autograd.gradcheck(decode, (latents.values, W_dec))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_unsorted_indices_match_dense(backend: Backend) -> None:
    B, k, d_sae, d_in = 20, 5, 40, 6
    values, indices = random_rows(B, k, d_sae, seed=7)
    gen = torch.Generator().manual_seed(7)
    W_dec = torch.randn(d_sae, d_in, dtype=F64, generator=gen, requires_grad=True)
    b_dec = torch.randn(d_in, dtype=F64, generator=gen, requires_grad=True)
    grad_out = torch.randn(B, d_in, dtype=F64, generator=gen)

    out = sparse_decode(SparseLatents.from_rows(values, indices, d_sae), W_dec, b_dec, backend=backend)
    ref = torch.zeros(B, d_sae, dtype=F64).scatter(1, indices, values) @ W_dec + b_dec
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (values, W_dec, b_dec), grad_out)
    want = torch.autograd.grad(ref, (values, W_dec, b_dec), grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_variable_rows_hand_computed(backend: Backend) -> None:
    # Token 0 holds latents 0 and 2, token 1 none, token 2 latent 1.
    pattern = SparsityPattern.from_entries(torch.tensor([0, 0, 2]), torch.tensor([0, 2, 1]), 3, 3)
    values = torch.tensor([2.0, 1.0, 3.0], dtype=F64, requires_grad=True)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64, requires_grad=True)
    out = sparse_decode(SparseLatents(values, pattern), W_dec, None, backend=backend)
    # x_hat_0 = 2 * [1, 0] + 1 * [1, 1] = [3, 1]; x_hat_1 = 0; x_hat_2 = 3 * [0, 1].
    assert out.tolist() == [[3.0, 1.0], [0.0, 0.0], [0.0, 3.0]]
    (out * torch.tensor([[1.0, 2.0], [5.0, 5.0], [0.0, 4.0]], dtype=F64)).sum().backward()
    # dL/dv_e = <c_token, W_dec[latent]>: <[1,2],[1,0]> = 1, <[1,2],[1,1]> = 3, <[0,4],[0,1]> = 4.
    assert values.grad is not None and values.grad.tolist() == [1.0, 3.0, 4.0]
    # grad W_dec[latent] = sum of value * c_token: row 0 = 2 * [1, 2], row 1 = 3 * [0, 4], row 2 = [1, 2].
    assert W_dec.grad is not None and W_dec.grad.tolist() == [[2.0, 4.0], [0.0, 12.0], [1.0, 2.0]]


def test_decode_rejects_wrong_decoder_shape() -> None:
    latents = variable_latents()
    with pytest.raises(SAELensError, match="W_dec must be"):
        sparse_decode(latents, torch.zeros(9, 3, dtype=F64), None)


# -- the kernel choice ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "dtype", "device", "want"),
    [
        # CPU: embedding_bag beat MKL's spmm for both S @ table and S.T @ per_token.
        ("auto", torch.float32, "cpu", KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=True)),
        ("csr", torch.float32, "cpu", KernelChoice(spmm_gather=True, spmm_scatter=True, sddmm=True)),
        # MKL has no half-precision kernels; its SDDMM runs them in float32.
        ("auto", torch.bfloat16, "cpu", KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=True)),
        ("csr", torch.float16, "cpu", KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=True)),
        ("index", torch.float64, "cpu", KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=False)),
        # CUDA: cuSPARSE for both spmm products (all float dtypes), gather + dot for sampled dots.
        ("auto", torch.float32, "cuda", KernelChoice(spmm_gather=True, spmm_scatter=True, sddmm=False)),
        ("auto", torch.bfloat16, "cuda", KernelChoice(spmm_gather=True, spmm_scatter=True, sddmm=False)),
        ("csr", torch.float32, "cuda", KernelChoice(spmm_gather=True, spmm_scatter=True, sddmm=True)),
        ("csr", torch.bfloat16, "cuda", KernelChoice(spmm_gather=True, spmm_scatter=True, sddmm=False)),
        ("index", torch.float32, "cuda", KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=False)),
        # Devices without sparse kernels fall back everywhere.
        ("csr", torch.float32, "meta", KernelChoice(spmm_gather=False, spmm_scatter=False, sddmm=False)),
    ],
)
def test_choose_kernels(backend: Backend, dtype: torch.dtype, device: str, want: KernelChoice) -> None:
    assert choose_kernels(backend, dtype, torch.device(device)) == want  # type: ignore[arg-type]


def test_choose_kernels_rejects_unknown_backend() -> None:
    with pytest.raises(SAELensError, match="backend must be one of"):
        choose_kernels("cusparse", torch.float32, torch.device("cpu"))  # type: ignore[arg-type]


# -- one latent-major sort per step, however many SAEs ---------------------------------------------


@pytest.fixture
def sorts(monkeypatch: pytest.MonkeyPatch) -> list[SparsityPattern]:
    """The patterns whose latent-major order gets computed, one item per sort, in order."""
    calls: list[SparsityPattern] = []
    original = SparsityPattern._sort_by_latent

    def counting(self: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(self)
        return original(self)

    monkeypatch.setattr(SparsityPattern, "_sort_by_latent", counting)
    return calls


def sae_step(
    p: Problem, encoder: str, k: int, backend: Backend = "auto"
) -> tuple[SparseLatents, torch.Tensor]:
    """Latents and the loss of one SAE step, called as the SAEs call the kernels."""
    latents = ENCODERS[encoder]((p["x"] - p["b_dec"]).detach(), p["W_enc"], p["b_enc"], k, backend=backend)
    x_hat = sparse_decode(latents, p["W_dec"], p["b_dec"], backend=backend)
    return latents, (x_hat - p["x"].detach()).pow(2).sum()


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sort_per_step_shared_by_both_backward_passes(
    make_problem, sorts: list[SparsityPattern], encoder: str, backend: Backend
) -> None:
    p = make_problem(32, 6, 64)
    latents, loss = sae_step(p, encoder, 4, backend)
    assert sorts == []  # the forward needs no latent-major order
    loss.backward()
    # Every backend reads S.T in latent-major order (spmm or embedding_bag): one sort, shared.
    assert sorts == [latents.pattern]
    assert p["W_enc"].grad is not None and p["W_dec"].grad is not None


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_two_saes_in_flight_match_separate_steps(
    make_problem, sorts: list[SparsityPattern], encoder: str
) -> None:
    def separate(seed: int) -> list[torch.Tensor]:
        p = make_problem(40, 6, 48, seed=seed)
        _, loss = sae_step(p, encoder, 3)
        return list(torch.autograd.grad(loss, [p[n] for n in PARAM_NAMES[1:]]))

    want = separate(1) + separate(2)
    sorts.clear()
    # Both encoders run before either decoder, and one backward covers both SAEs, which a
    # one-slot cache would serve the wrong order to.
    p1, p2 = make_problem(40, 6, 48, seed=1), make_problem(40, 6, 48, seed=2)
    ins = [((p["x"] - p["b_dec"]).detach(), p) for p in (p1, p2)]
    latents = [ENCODERS[encoder](x, p["W_enc"], p["b_enc"], 3) for x, p in ins]
    losses = [
        (sparse_decode(lat, p["W_dec"], p["b_dec"]) - p["x"].detach()).pow(2).sum()
        for lat, p in zip(latents, (p1, p2), strict=True)
    ]
    got = torch.autograd.grad(sum(losses), [p[n] for p in (p1, p2) for n in PARAM_NAMES[1:]])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert sorted(map(id, sorts)) == sorted(id(lat.pattern) for lat in latents)


def test_threads_stepping_at_once_match_sequential(make_problem) -> None:
    problems = [make_problem(64, 8, 128, seed=s) for s in range(2)]

    def step(p: Problem) -> list[torch.Tensor]:
        results: list[torch.Tensor] = []
        for encoder in ("topk", "batchtopk", "topk"):
            _, loss = sae_step(p, encoder, 4)
            results += torch.autograd.grad(loss, [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]])
        return results

    want = [step(p) for p in problems]
    got: list[list[torch.Tensor]] = [[], []]

    def run(i: int) -> None:
        for _ in range(5):
            got[i] = step(problems[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g_thread, w_thread in zip(got, want, strict=True):
        for g, w in zip(g_thread, w_thread, strict=True):
            torch.testing.assert_close(g, w)


def test_each_subset_sorts_its_own_pattern_once(make_problem, sorts: list[SparsityPattern]) -> None:
    # Matryoshka-style: the batch's latents decoded in bands, each band its own pattern.
    p = make_problem(32, 6, 64)
    latents = sparse_batchtopk_encode((p["x"] - p["b_dec"]).detach(), p["W_enc"], p["b_enc"], 4)
    bands = [latents.subset(latents.indices < 16), latents.subset(latents.indices >= 16)]
    out = sum(sparse_decode(band, p["W_dec"], None) for band in bands)
    (out - p["x"].detach()).pow(2).sum().backward()
    assert sorted(map(id, sorts)) == sorted(id(x.pattern) for x in [latents, *bands])
    torch.testing.assert_close(out, sparse_decode(latents, p["W_dec"].detach(), None).detach())


# -- autocast -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_close_to_float32(make_problem, encoder: str, backend: Backend) -> None:
    """Under CPU bf16 autocast the kernels compute in bf16 and return float32 parameter
    gradients close to the float32 formulation (on the support the bf16 pass chose)."""
    p = make_problem(64, 16, 128, torch.float32, seed=3)
    sae_in = (p["x"] - p["b_dec"]).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = ENCODERS[encoder](sae_in, p["W_enc"], p["b_enc"], 8, backend=backend)
        x_hat = sparse_decode(latents, p["W_dec"], p["b_dec"], backend=backend)
    assert latents.values.dtype == torch.bfloat16
    loss = (x_hat.float() - p["x"].detach()).pow(2).sum()
    params = [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]]
    got = torch.autograd.grad(loss, params)
    assert all(g.dtype == torch.float32 for g in got)

    # float32 reference with the same active entries.
    pre = sae_in @ p["W_enc"] + p["b_enc"]
    support = torch.zeros_like(pre, dtype=torch.bool).index_put_(
        (latents.rows, latents.indices), torch.tensor(True)
    )
    acts = (pre * support).relu()
    x_ref = acts @ p["W_dec"] + p["b_dec"]
    scale = x_ref.abs().max().item()
    assert (x_hat.float() - x_ref).abs().max().item() < 0.03 * scale
    want = torch.autograd.grad((x_ref - p["x"].detach()).pow(2).sum(), params)
    for name, g, w in zip(PARAM_NAMES[1:], got, want, strict=True):
        assert (g - w).abs().max().item() < 0.03 * w.abs().max().item(), name
