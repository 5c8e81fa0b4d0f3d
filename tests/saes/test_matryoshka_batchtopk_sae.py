"""Matryoshka BatchTopK SAE: prefix losses by hand and against a dense reference, validation,
saving, and a short training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.saes.aux_k import aux_k_loss
from sae_lens.saes.batchtopk_sae import BatchTopKSAE
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKSAE, default_matryoshka_widths
from sae_lens.saes.sae import SparseAutoencoder, TrainingBatch
from tests.conftest import make_sae_config
from tests.saes.test_batchtopk_sae import X, run_training

F64 = torch.float64


def tiny_sae(widths: list[int] | None) -> MatryoshkaBatchTopKSAE:
    """The BatchTopK hand example (d_in=2, d_sae=4, k=1) as a Matryoshka SAE."""
    cfg = make_sae_config("matryoshka_batchtopk", 2, 4, dtype="float64", k=1, matryoshka_widths=widths)
    sae = SparseAutoencoder(cfg)
    assert isinstance(sae, MatryoshkaBatchTopKSAE)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, -1.0]))
    return sae


@pytest.mark.parametrize(
    ("widths", "prefix_mses"),
    [
        # Kept: latent 0 (3.0) and latent 2 (6.0), both on token 0; x = [[4, 0], [2, -3]].
        # Width 1: x̂_0 = 3 * [1, 0] + b_dec = [4, -1] -> error 1; x̂_1 = b_dec -> error 5; MSE 3.
        # Widths 3 and 4: x̂_0 = [7, 2] -> error 13; MSE (13 + 5) / 2 = 9.
        ([1, 3, 4], [3.0, 9.0, 9.0]),
        ([2, 4], [3.0, 9.0]),
        ([4], [9.0]),
        (None, [3.0, 9.0]),  # default [4 // 16, 4 // 4, 4] -> [1, 4]
    ],
)
def test_prefix_losses_by_hand(widths: list[int] | None, prefix_mses: list[float]) -> None:
    sae = tiny_sae(widths)
    out = sae.training_forward_pass(X)
    assert out.loss.item() == sum(prefix_mses)
    assert out.mse_loss.item() == 9.0  # the full width's
    assert out.sae_out.tolist() == [[7.0, 2.0], [1.0, -1.0]]
    assert out.feature_acts.to_dense().tolist() == [[3.0, 0.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert sae.threshold.tolist() == [3.0] * 4


def test_prefix_reconstructions_by_hand() -> None:
    sae = tiny_sae([1, 3, 4])
    encoding = sae.encode_for_training(X)
    recons = sae.prefix_reconstructions(encoding)
    assert [r.tolist() for r in recons] == [
        [[4.0, -1.0], [1.0, -1.0]],
        [[7.0, 2.0], [1.0, -1.0]],
        [[7.0, 2.0], [1.0, -1.0]],
    ]


@pytest.mark.parametrize("widths", [[5, 17, 40], [40], [1, 2, 3, 39, 40]])
def test_matches_dense_reference(widths: list[int]) -> None:
    torch.manual_seed(0)
    cfg = make_sae_config(
        "matryoshka_batchtopk",
        12,
        40,
        dtype="float64",
        k=5,
        matryoshka_widths=widths,
        aux_k=4,
        aux_k_coefficient=0.25,
    )
    sae = SparseAutoencoder(cfg)
    assert isinstance(sae, MatryoshkaBatchTopKSAE)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(30, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[1::4] = True
    out = sae.training_forward_pass(x, dead)
    got = torch.autograd.grad(out.loss, list(sae.parameters()))

    acts = sae.encode_batchtopk(x)
    losses = [(acts[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(-1).mean() for m in widths]
    full = acts @ sae.W_dec + sae.b_dec
    batch = TrainingBatch(x, acts, sae_out=full, dead_neuron_mask=dead)
    aux = aux_k_loss(sae, batch)["aux_k"]  # weighted by 0.25
    want = torch.autograd.grad(sum(losses) + aux, list(sae.parameters()))
    torch.testing.assert_close(out.loss, sum(losses) + aux)
    torch.testing.assert_close(out.mse_loss, losses[-1])
    torch.testing.assert_close(out.sae_out, full)
    torch.testing.assert_close(out.ghost_grad_loss, aux)
    for (name, _), g, w in zip(sae.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, msg=f"grad of {name} differs")


def test_default_widths() -> None:
    assert default_matryoshka_widths(1024) == [64, 256, 1024]
    assert default_matryoshka_widths(8) == [2, 8]
    assert default_matryoshka_widths(1) == [1]
    sae = SparseAutoencoder(make_sae_config("matryoshka_batchtopk", 4, 64, k=2))
    assert isinstance(sae, MatryoshkaBatchTopKSAE) and sae.matryoshka_widths == [4, 16, 64]


@pytest.mark.parametrize(
    "widths",
    [[], [8, 4, 16], [4, 4, 16], [0, 16], [4, 8], [4, 32], [4.0, 16], [True, 16], "16"],
)
def test_validation_rejects_bad_widths(widths) -> None:
    # The config itself rejects them now, before any SAE is built.
    with pytest.raises(SAELensError, match="matryoshka_widths") as error:
        SparseAutoencoder(make_sae_config("matryoshka_batchtopk", 4, 16, k=2, matryoshka_widths=widths))
    assert "\n" not in str(error.value)


def test_validation_still_checks_k() -> None:
    with pytest.raises(SAELensError, match="k"):
        SparseAutoencoder(make_sae_config("matryoshka_batchtopk", 4, 16, k=None, matryoshka_widths=[4, 16]))


def trained(widths: list[int]) -> tuple[MatryoshkaBatchTopKSAE, torch.Tensor]:
    torch.manual_seed(0)
    cfg = make_sae_config(
        "matryoshka_batchtopk", 12, 40, dtype="float64", k=5, matryoshka_widths=widths, topk_threshold_lr=0.5
    )
    sae = SparseAutoencoder(cfg)
    assert isinstance(sae, MatryoshkaBatchTopKSAE)
    for seed in range(3):
        sae.training_forward_pass(
            torch.randn(25, 12, dtype=F64, generator=torch.Generator().manual_seed(seed))
        )
    sae.eval()
    return sae, torch.randn(50, 12, dtype=F64, generator=torch.Generator().manual_seed(9))


def test_save_native_round_trip(tmp_path: Path) -> None:
    sae, x = trained([10, 40])
    sae.save_model(tmp_path, as_jumprelu=False)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "matryoshka_batchtopk" and cfg["matryoshka_widths"] == [10, 40]
    loaded = SparseAutoencoder.load_from_disk(tmp_path)
    assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.matryoshka_widths == [10, 40]
    loaded.eval()
    assert torch.equal(loaded.threshold, sae.threshold)
    assert torch.equal(loaded(x), sae(x))


def test_save_as_jumprelu(tmp_path: Path) -> None:
    import sae_lens.saes.jumprelu_sae  # noqa: F401  (registers "jumprelu")

    sae, x = trained([10, 40])
    sae.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["trained_architecture"] == "matryoshka_batchtopk"
    loaded = SparseAutoencoder.load_from_disk(tmp_path)
    assert loaded.architecture_name == "jumprelu" and not isinstance(loaded, BatchTopKSAE)
    loaded.eval()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


def test_training_improves_explained_variance() -> None:
    before, after, sae, held_out = run_training("matryoshka_batchtopk", matryoshka_widths=[16, 64])
    assert isinstance(sae, MatryoshkaBatchTopKSAE)
    assert after > 0.85 and after > before + 0.3, (before, after)
    sae.eval()
    with torch.no_grad():
        assert explained_variance(held_out, sae(held_out)) > 0.8
        # The first 16 latents alone already explain a good part of the data.
        acts = sae.encode(held_out)
        acts[:, 16:] = 0
        assert explained_variance(held_out, sae.decode(acts)) > 0.4
