"""BatchTopK SAE (sae_lens/saes/batchtopk_sae.py): the hand-computed maths, the threshold EMA,
JumpReLU inference, the sparse training step against the dense rule (with each kernel backend),
saving (as jumprelu and natively) and a short training run.

The sparse kernels themselves are tested in tests/kernels/test_batchtopk.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.saes.aux_k import aux_k_loss
from sae_lens.saes.batchtopk_sae import BatchTopKSAE, batch_topk
from sae_lens.saes.sae import SparseAutoencoder, TrainingBatch
from sae_lens.training.trainer import SAETrainer
from tests.conftest import make_runner_config, make_sae_config

F64 = torch.float64
BACKENDS = ["auto", "csr", "index"]


# -- the SAE --------------------------------------------------------------------------------------


def tiny_sae(lr: float = 0.1, **overrides) -> BatchTopKSAE:
    """The hand-computed example's weights in a d_in=2, d_sae=4, k=1 SAE (float64)."""
    cfg = make_sae_config("batchtopk", 2, 4, dtype="float64", k=1, topk_threshold_lr=lr, **overrides)
    sae = SparseAutoencoder(cfg)
    assert isinstance(sae, BatchTopKSAE)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, -1.0]))
    return sae


X = torch.tensor([[4.0, 0.0], [2.0, -3.0]], dtype=F64)  # sae_in = [[3, 1], [1, -2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_pass_hand_computed(backend: str) -> None:
    sae = tiny_sae()
    sae.kernel_backend = backend
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
    cfg = make_sae_config("batchtopk", d_in, d_sae, dtype="float64", k=k, **overrides)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    assert isinstance(sae, BatchTopKSAE)
    return sae


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_pass_matches_dense_with_aux_k(backend: str) -> None:
    sae = random_sae(aux_k=6, aux_k_coefficient=0.5)
    sae.kernel_backend = backend
    x = torch.randn(30, 12, dtype=F64, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_forward_pass(x, dead)
    assert out.ghost_grad_loss.item() > 0
    got = torch.autograd.grad(out.loss, list(sae.parameters()))

    acts = sae.encode_batchtopk(x)
    sae_out = acts @ sae.W_dec + sae.b_dec
    mse = (sae_out - x).pow(2).sum(-1).mean()
    batch = TrainingBatch(x, acts, sae_out=sae_out, dead_neuron_mask=dead)
    aux = aux_k_loss(sae, batch)["aux_k"]  # weighted by 0.5
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
        SparseAutoencoder(make_sae_config("batchtopk", 12, 40, k=k))


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
    assert "k" not in cfg and cfg["metadata"]["batchtopk_k"] == 5
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
    cfg = make_runner_config(
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


def test_batchtopk_is_not_a_topk_subclass_but_shares_its_options() -> None:
    from sae_lens.saes import BatchTopKSAEConfig, TopKSAE, TopKSAEConfig

    assert not issubclass(BatchTopKSAE, TopKSAE)
    assert issubclass(BatchTopKSAEConfig, TopKSAEConfig)
    assert {"k", "aux_k", "aux_k_coefficient", "topk_threshold_lr"} <= set(BatchTopKSAEConfig.option_names())


def test_jumprelu_folder_holds_no_training_only_options(tmp_path: Path) -> None:
    sae, _ = trained_sae()
    sae.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert not {"k", "aux_k", "aux_k_coefficient", "topk_threshold_lr"} & set(cfg)
    assert {"l1_coefficient", "jumprelu_bandwidth"} <= set(cfg)


def test_dense_batch_topk_by_hand() -> None:
    pre = torch.tensor([[3.0, 1.0, 6.0, -0.5], [1.0, -2.0, 2.0, 2.5]], dtype=F64)
    # k=1 over 2 tokens keeps the 2 largest entries of the batch (both in token 0).
    assert batch_topk(pre, 1).tolist() == [[3.0, 0.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    # k=3 keeps the 6 largest (6, 3, 2.5, 2, 1, 1); -0.5 and -2 are dropped.
    assert batch_topk(pre, 3).tolist() == [[3.0, 1.0, 6.0, 0.0], [1.0, 0.0, 2.0, 2.5]]
    # Leading dimensions are flattened together: [1, 2, 4] is the same batch of 2 tokens.
    assert torch.equal(batch_topk(pre[None], 1)[0], batch_topk(pre, 1))
