"""BatchTopK SAE: the sparse kernels against dense references, the hand-computed maths, the
threshold EMA, JumpReLU inference, saving (as jumprelu and natively) and a short training run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae_lens.kernels.sparse_batchtopk as kernel_module
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.kernels.sparse_batchtopk import (
    BatchTopKActs,
    _nonzero_1d,
    batchtopk_dense_from_sparse,
    sparse_batchtopk_encode,
    sparse_csr_decode,
)
from sae_lens.saes.batchtopk_sae import BatchTopKSAE, batch_topk
from sae_lens.saes.sae import SAEConfig, SparseAutoencoder
from sae_lens.training.trainer import SAETrainer

F64 = torch.float64
PARAM_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture(params=["auto", "index"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the CSR kernels and with the index fallback."""
    old = kernel_module._BACKEND
    kernel_module._BACKEND = request.param
    yield request.param
    kernel_module._BACKEND = old


# -- the kernels ----------------------------------------------------------------------------------


def make_problem(
    B: int,
    d_in: int,
    d_sae: int,
    dtype: torch.dtype = F64,
    seed: int = 0,
    shift: float = 0.0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int, add: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, dtype=dtype) + add
        return t.to(device).requires_grad_()

    return {
        "x": leaf(B, d_in),
        "W_enc": leaf(d_in, d_sae),
        "b_enc": leaf(d_sae, add=shift),
        "W_dec": leaf(d_sae, d_in),
        "b_dec": leaf(d_in),
    }


def dense_reference(p: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd BatchTopK: (acts [B, d_sae], x_hat [B, d_in])."""
    acts = batch_topk((p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"], k)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def sparse_path(p: dict[str, torch.Tensor], k: int, chunk_rows: int | None = None):
    acts = sparse_batchtopk_encode(p["x"] - p["b_dec"], p["W_enc"], p["b_enc"], k, chunk_rows=chunk_rows)
    return acts, sparse_csr_decode(acts, p["W_dec"], p["b_dec"])


def assert_csr_invariants(acts: BatchTopKActs, n_tokens: int) -> None:
    assert acts.offsets.shape == (n_tokens + 1,) and int(acts.offsets[0]) == 0
    assert int(acts.offsets[-1]) == acts.values.shape[0] == acts.indices.shape[0] == acts.rows.shape[0]
    counts = acts.offsets.diff()
    assert torch.equal(
        acts.rows, torch.repeat_interleave(torch.arange(n_tokens, device=counts.device), counts)
    )
    # Within a token the latent indices ascend (sorted by token, then latent).
    key = acts.rows * 10**9 + acts.indices
    assert bool((key[1:] > key[:-1]).all())
    assert bool((acts.values > 0).all())


def assert_matches_dense(
    B: int,
    d_in: int,
    d_sae: int,
    k: int,
    *,
    dtype: torch.dtype = F64,
    chunk_rows: int | None = None,
    shift: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> BatchTopKActs:
    tol = 1e-10 if dtype == F64 else 1e-4
    p = make_problem(B, d_in, d_sae, dtype, seed, shift, device)
    acts, x_hat = sparse_path(p, k, chunk_rows)
    acts_ref, x_hat_ref = dense_reference(p, k)
    assert_csr_invariants(acts, B)
    assert acts.values.shape[0] == int((acts_ref > 0).sum())
    torch.testing.assert_close(batchtopk_dense_from_sparse(acts, d_sae), acts_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x_hat, x_hat_ref, atol=tol, rtol=tol)
    grad_out = torch.randn(B, d_in, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    params = [p[n] for n in PARAM_NAMES]
    got = torch.autograd.grad(x_hat, params, grad_out)
    want = torch.autograd.grad(x_hat_ref, params, grad_out)
    for name, g, w in zip(PARAM_NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=f"grad of {name} differs")
    return acts


def test_kernel_hand_computed(backend: str) -> None:
    # B=2, d_in=2, d_sae=4, k=1: the batch keeps K=2 entries, here both in token 0.
    x = torch.tensor([[4.0, 0.0], [2.0, -3.0]], dtype=F64, requires_grad=True)
    b_dec = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)
    W_enc = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]], dtype=F64, requires_grad=True)
    b_enc = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=F64, requires_grad=True)
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -1.0]], dtype=F64, requires_grad=True)
    # sae_in = x - b_dec = [[3, 1], [1, -2]]
    # pre_0 = [3, 1, 6, -0.5], pre_1 = [1, -2, 2, 2.5]; the two largest overall are 6 and 3 (token 0).
    acts = sparse_batchtopk_encode(x - b_dec, W_enc, b_enc, 1)
    assert acts.values.tolist() == [3.0, 6.0]
    assert acts.indices.tolist() == [0, 2]
    assert acts.offsets.tolist() == [0, 2, 2]
    assert acts.rows.tolist() == [0, 0]
    # x_hat_0 = 3 * [1, 0] + 6 * [.5, .5] + b_dec = [7, 2]; token 1 has no latent: x_hat_1 = b_dec.
    x_hat = sparse_csr_decode(acts, W_dec, b_dec)
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


@pytest.mark.parametrize(
    ("B", "d_in", "d_sae", "k"),
    [(37, 11, 50, 7), (64, 16, 96, 1), (9, 5, 12, 12), (1, 4, 8, 3), (16, 8, 128, 100)],
)
def test_kernel_matches_dense_float64(backend: str, B: int, d_in: int, d_sae: int, k: int) -> None:
    assert_matches_dense(B, d_in, d_sae, k)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 1000])
def test_kernel_chunking_matches_dense(backend: str, chunk_rows: int) -> None:
    assert_matches_dense(37, 11, 50, 7, chunk_rows=chunk_rows)


def test_kernel_matches_dense_float32(backend: str) -> None:
    assert_matches_dense(128, 32, 256, 16, dtype=torch.float32, seed=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_kernel_matches_dense_cuda(backend: str, dtype: torch.dtype) -> None:
    assert_matches_dense(256, 32, 512, 8, dtype=dtype, device="cuda")
    assert_matches_dense(37, 11, 50, 7, dtype=dtype, chunk_rows=5, device="cuda")


def test_kernel_tokens_get_variable_numbers_of_latents() -> None:
    acts = assert_matches_dense(64, 16, 96, 4, seed=5)
    counts = acts.offsets.diff()
    assert int(counts.sum()) == 64 * 4
    assert int(counts.min()) != int(counts.max())


def test_kernel_drops_non_positive_entries(backend: str) -> None:
    # Most pre-activations are negative: fewer than k*B entries are positive, and only those stay.
    acts = assert_matches_dense(40, 6, 30, 8, shift=-4.0)
    assert 0 < acts.values.shape[0] < 40 * 8


def test_kernel_all_negative_gives_no_entries(backend: str) -> None:
    p = make_problem(10, 4, 12, shift=-100.0)
    acts, x_hat = sparse_path(p, 3)
    assert acts.values.shape[0] == 0 and acts.offsets.tolist() == [0] * 11
    torch.testing.assert_close(x_hat, p["b_dec"].expand(10, 4))
    grads = torch.autograd.grad(x_hat.sum(), [p["W_enc"], p["b_enc"], p["W_dec"]])
    assert all(bool((g == 0).all()) for g in grads)


def test_kernel_pruning_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny prune factor and sample force the "raise the bound" branch on every chunk.
    monkeypatch.setattr(kernel_module, "_PRUNE_FACTOR", 1)
    monkeypatch.setattr(kernel_module, "_SAMPLE_SIZE", 4)
    assert_matches_dense(50, 8, 64, 3, chunk_rows=4)


def test_kernel_estimate_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first chunk's tokens are much larger than the rest, so the bound estimated from it keeps
    # too few candidates: the selection must notice and redo it exactly.
    calls: list[bool] = []
    original = kernel_module._select

    def spy(*args, **kwargs):
        calls.append(kwargs["estimate"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "_select", spy)
    p = make_problem(40, 6, 32, seed=2)
    with torch.no_grad():
        p["x"][:4] *= 50
    acts, x_hat = sparse_path(p, 2, chunk_rows=4)
    assert calls == [True, False]
    acts_ref, x_hat_ref = dense_reference(p, 2)
    torch.testing.assert_close(batchtopk_dense_from_sparse(acts, 32), acts_ref)
    torch.testing.assert_close(x_hat, x_hat_ref)


@pytest.mark.parametrize("prune_factor", [4, 1])
def test_kernel_ties_keep_exactly_k_per_token_on_average(
    monkeypatch: pytest.MonkeyPatch, prune_factor: int
) -> None:
    # Every token has the same pre-activations (W_enc = 0), so the K-th value is tied B times.
    monkeypatch.setattr(kernel_module, "_PRUNE_FACTOR", prune_factor)
    B, d_sae, k = 10, 6, 2
    b_enc = torch.tensor([3.0, 1.0, 2.0, 2.0, -1.0, 0.5], dtype=F64)
    acts = sparse_batchtopk_encode(torch.randn(B, 3, dtype=F64), torch.zeros(3, d_sae, dtype=F64), b_enc, k)
    assert_csr_invariants(acts, B)
    # 3.0 ten times, then 10 of the 20 entries tied at 2.0.
    assert acts.values.shape[0] == B * k
    assert sorted(acts.values.tolist()) == [2.0] * 10 + [3.0] * 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_keeps_a_valid_top_k(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((64, 16), (16, 128), (128,)))
    W.requires_grad_()
    acts = sparse_batchtopk_encode(x, W, b, 4, chunk_rows=64)
    pre = torch.addmm(b, x, W.detach())  # the kernel's own arithmetic, so rounding agrees
    dense = batchtopk_dense_from_sparse(acts, 128).detach()
    kept = dense != 0
    assert int(kept.sum()) == 64 * 4
    assert torch.equal(dense[kept], pre[kept])
    assert pre[kept].min() >= pre[~kept].max()
    (grad_W,) = torch.autograd.grad(acts.values.float().sum(), [W])
    want = x.float().T @ kept.float()
    torch.testing.assert_close(grad_W.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 64, 1001])
def test_nonzero_1d_matches_nonzero(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.9
    assert torch.equal(_nonzero_1d(mask), mask.nonzero().squeeze(1))
    assert torch.equal(_nonzero_1d(mask[1:]), mask[1:].nonzero().squeeze(1))


def test_kernel_rejects_bad_inputs() -> None:
    p = make_problem(4, 3, 5)
    with pytest.raises(ValueError, match="k must be"):
        sparse_batchtopk_encode(p["x"], p["W_enc"], p["b_enc"], 6)
    with pytest.raises(ValueError, match=r"\[n_tokens, d_in\]"):
        sparse_batchtopk_encode(p["x"][None], p["W_enc"], p["b_enc"], 2)


# -- the SAE --------------------------------------------------------------------------------------


def tiny_sae(lr: float = 0.1, **overrides) -> BatchTopKSAE:
    """The hand-computed example's weights in a d_in=2, d_sae=4, k=1 SAE (float64)."""
    cfg = SAEConfig(
        d_in=2, d_sae=4, architecture="batchtopk", dtype="float64", k=1, topk_threshold_lr=lr, **overrides
    )
    sae = SparseAutoencoder(cfg)
    assert isinstance(sae, BatchTopKSAE)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, -1.0]))
    return sae


X = torch.tensor([[4.0, 0.0], [2.0, -3.0]], dtype=F64)  # sae_in = [[3, 1], [1, -2]]


def test_training_forward_pass_hand_computed() -> None:
    sae = tiny_sae()
    out = sae.training_forward_pass(X)
    assert out.sae_out.tolist() == [[7.0, 2.0], [1.0, -1.0]]
    assert out.feature_acts.to_dense().tolist() == [[3.0, 0.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    # Squared errors: ‖[7, 2] - [4, 0]‖² = 13 and ‖[1, -1] - [2, -3]‖² = 5; mean 9.
    assert out.mse_loss.item() == 9.0 and out.loss.item() == 9.0
    assert out.l1_loss.item() == 0.0 and out.ghost_grad_loss.item() == 0.0


def test_threshold_ema_by_hand() -> None:
    sae = tiny_sae(lr=0.1)
    assert sae.threshold.tolist() == [0.0] * 4  # not set yet
    sae.training_forward_pass(X)
    # First batch: smallest kept activation is 3 -> the threshold starts there.
    assert sae.threshold.tolist() == [3.0] * 4
    # Second batch: sae_in = [[1, -2], [0, 1]] -> pre = [1, -2, 2, 2.5] and [0, 1, 0, -1.5]; the two
    # kept are 2.5 and 2, so the EMA moves to 0.9 * 3 + 0.1 * 2 = 2.9.
    sae.training_forward_pass(torch.tensor([[2.0, -3.0], [1.0, 0.0]], dtype=F64))
    torch.testing.assert_close(sae.threshold, torch.full((4,), 2.9, dtype=F64))
    # In eval mode the training pass leaves it alone.
    sae.eval()
    sae.training_forward_pass(X)
    torch.testing.assert_close(sae.threshold, torch.full((4,), 2.9, dtype=F64))


def test_eval_is_jumprelu_with_the_threshold() -> None:
    sae = tiny_sae()
    sae.training_forward_pass(X)  # threshold = 3
    sae.eval()
    # pre_0 = [3, 1, 6, -0.5]: 3 is not above the threshold 3 (strict), 6 is; pre_1 peaks at 2.5.
    assert sae.encode(X).tolist() == [[0.0, 0.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert sae(X).tolist() == [[4.0, 2.0], [1.0, -1.0]]
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    assert sae.encode(X).tolist() == [[3.0, 1.0, 6.0, 0.0], [1.0, 0.0, 2.0, 2.5]]
    # encode is JumpReLU in training mode too; the batch rule is encode_batchtopk.
    sae.train()
    assert sae.encode(X).tolist() == [[3.0, 1.0, 6.0, 0.0], [1.0, 0.0, 2.0, 2.5]]
    assert sae.encode_batchtopk(X).tolist() == [[3.0, 0.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def random_sae(seed: int = 0, d_in: int = 12, d_sae: int = 40, k: int = 5, **overrides) -> BatchTopKSAE:
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="batchtopk", dtype="float64", k=k, **overrides)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    assert isinstance(sae, BatchTopKSAE)
    return sae


def test_training_forward_pass_matches_dense_with_aux_k() -> None:
    sae = random_sae(aux_k=6, aux_k_coefficient=0.5)
    x = torch.randn(30, 12, dtype=F64, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_forward_pass(x, dead)
    assert out.ghost_grad_loss.item() > 0
    got = torch.autograd.grad(out.loss, list(sae.parameters()))

    acts = sae.encode_batchtopk(x)
    sae_out = acts @ sae.W_dec + sae.b_dec
    mse = (sae_out - x).pow(2).sum(-1).mean()
    aux = 0.5 * sae.aux_k_loss(x, sae_out, dead)
    want = torch.autograd.grad(mse + aux, list(sae.parameters()))
    torch.testing.assert_close(out.feature_acts.to_dense(), acts.detach())
    torch.testing.assert_close(out.sae_out, sae_out)
    torch.testing.assert_close(out.mse_loss, mse)
    torch.testing.assert_close(out.ghost_grad_loss, aux)
    for (name, _), g, w in zip(sae.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, msg=f"grad of {name} differs")


def test_fold_W_dec_norm_keeps_inference_outputs() -> None:
    sae = random_sae()
    sae.training_forward_pass(torch.randn(20, 12, dtype=F64))
    # (A fresh batch: the training batch has a pre-activation exactly at the threshold.)
    x = torch.randn(20, 12, dtype=F64)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1, dtype=F64) + 0.5)
    sae.eval()
    before = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x), before)


def test_fold_activation_scale_keeps_the_threshold_valid() -> None:
    # Trained on s * x; after folding s the SAE takes raw x with the same latents, x̂ / s out.
    sae = random_sae()
    s = 3.0
    sae.training_forward_pass(s * torch.randn(20, 12, dtype=F64))
    sae.eval()
    x = torch.randn(20, 12, dtype=F64)
    acts, out = sae.encode(s * x), sae(s * x)
    sae.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), out / s)


@pytest.mark.parametrize("k", [None, 0, 41])
def test_validation_rejects_bad_k(k: int | None) -> None:
    with pytest.raises(SAELensError, match="k"):
        SparseAutoencoder(SAEConfig(d_in=12, d_sae=40, architecture="batchtopk", k=k))


# -- saving and loading ---------------------------------------------------------------------------


def trained_sae() -> tuple[BatchTopKSAE, torch.Tensor]:
    sae = random_sae(topk_threshold_lr=0.5)
    for seed in range(3):
        sae.training_forward_pass(
            torch.randn(25, 12, dtype=F64, generator=torch.Generator().manual_seed(seed))
        )
    sae.eval()
    return sae, torch.randn(50, 12, dtype=F64, generator=torch.Generator().manual_seed(9))


def test_save_native_round_trip(tmp_path: Path) -> None:
    sae, x = trained_sae()
    sae.save_model(tmp_path, torch.zeros(40), as_jumprelu=False)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "batchtopk" and cfg["k"] == 5
    loaded = SparseAutoencoder.load_from_disk(tmp_path)
    assert type(loaded) is BatchTopKSAE
    loaded.eval()
    assert torch.equal(loaded.threshold, sae.threshold)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_save_as_jumprelu_writes_a_jumprelu_folder(tmp_path: Path) -> None:
    sae, _ = trained_sae()
    sae.save_model(tmp_path, torch.zeros(40))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["k"] is None and cfg["metadata"]["batchtopk_k"] == 5
    assert cfg["metadata"]["trained_architecture"] == "batchtopk"
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert weights["threshold"].shape == (40,)
    assert torch.equal(weights["threshold"], sae.threshold)
    assert (tmp_path / "sparsity.safetensors").is_file()


def test_save_as_jumprelu_loads_as_jumprelu(tmp_path: Path) -> None:
    # Needs the jumprelu architecture (sae_lens/saes/jumprelu_sae.py) to be registered.
    import sae_lens.saes.jumprelu_sae  # noqa: F401

    sae, x = trained_sae()
    sae.save_model(tmp_path)
    loaded = SparseAutoencoder.load_from_disk(tmp_path)
    assert loaded.architecture_name == "jumprelu"
    loaded.eval()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


# -- training -------------------------------------------------------------------------------------


def sparse_synthetic_batches(
    n_batches: int, batch: int = 256, d_in: int = 16, n_dirs: int = 32, active: int = 3, seed: int = 0
) -> list[torch.Tensor]:
    """x = sum of `active` random unit directions (of `n_dirs`) with positive weights."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d_in, generator=gen)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    out = []
    for _ in range(n_batches):
        chosen = torch.rand(batch, n_dirs, generator=gen).argsort(dim=-1)[:, :active]
        coeffs = torch.zeros(batch, n_dirs).scatter(1, chosen, torch.rand(batch, active, generator=gen) + 0.5)
        out.append(coeffs @ dirs)
    return out


def run_training(architecture: str, **extra) -> tuple[float, float, SparseAutoencoder, torch.Tensor]:
    """Train on synthetic sparse data; returns (EV before, EV after (training rule), sae, held-out x)."""
    torch.manual_seed(0)
    batches = sparse_synthetic_batches(201)
    held_out = batches.pop()
    cfg = LanguageModelSAERunnerConfig(
        architecture=architecture,
        d_in=16,
        d_sae=64,
        k=4,
        lr=2e-2,
        train_batch_size=256,
        total_training_tokens=256 * len(batches),
        b_dec_init_method="mean",
        dead_feature_window=20,
        wandb_log_frequency=50,
        topk_threshold_lr=0.05,
        **extra,
    )
    sae = SparseAutoencoder(cfg)

    def ev() -> float:
        sae.eval()  # the training pass leaves the threshold alone in eval mode
        with torch.no_grad():
            out = sae.training_forward_pass(held_out)
        sae.train()
        return explained_variance(held_out, out.sae_out)

    before = ev()
    SAETrainer(cfg, sae, show_progress=False).fit(batches)
    return before, ev(), sae, held_out


def test_training_improves_explained_variance() -> None:
    before, after, sae, held_out = run_training("batchtopk")
    assert isinstance(sae, BatchTopKSAE)
    assert after > 0.85 and after > before + 0.3, (before, after)
    # Inference with the learned threshold is about as good, at about k latents per token.
    sae.eval()
    with torch.no_grad():
        acts = sae.encode(held_out)
        assert explained_variance(held_out, sae.decode(acts)) > 0.8
    assert 2 < (acts > 0).sum(-1).float().mean().item() < 8
