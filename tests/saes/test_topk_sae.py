"""TopK SAE (sae_lens/saes/topk_sae.py): the top-k rule against an argsort reference, the sparse
training path against the dense one (with each kernel backend), config checks and weight folding."""

from __future__ import annotations

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import SparseAutoencoder, TopKSAEConfig
from tests.saes.helpers import make_sae, rand_x, randomise


def dense_topk_reference(sae: SparseAutoencoder, x: torch.Tensor, k: int) -> torch.Tensor:
    """Latents of a TopK SAE computed with argsort rather than topk."""
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        keep = pre.argsort(dim=-1, descending=True)[:, :k]
        acts = torch.zeros_like(pre)
        for t in range(x.shape[0]):
            for i in keep[t].tolist():
                acts[t, i] = max(float(pre[t, i]), 0.0)
        return acts


def test_config_options_and_defaults() -> None:
    cfg = TopKSAEConfig(d_in=4, d_sae=64)
    assert (cfg.k, cfg.aux_k, cfg.aux_k_coefficient, cfg.encoder_init_scale) == (32, None, 8.0, None)
    assert cfg.initial_encoder_scale == 0.5
    assert cfg.architecture == "topk"
    assert not hasattr(cfg, "l1_coefficient")


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_the_encoder_starts_as_the_scaled_decoder_transpose(architecture: str) -> None:
    options = {"matryoshka_widths": [4, 10]} if architecture == "matryoshka_batchtopk" else {}
    sae = make_sae(architecture, k=2, encoder_init_scale=0.5, **options)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(10, dtype=torch.float64))
    assert torch.equal(sae.W_enc, sae.W_dec.T * 0.5)
    unit = make_sae(architecture, k=2, encoder_init_scale=1.0, **options)
    assert torch.equal(unit.W_enc, unit.W_dec.T)
    # Unset: 16 / k, clamped to [0.35, 1].
    wide_options = {"matryoshka_widths": [16, 64]} if options else {}
    for k, scale in ((2, 1.0), (16, 1.0), (20, 0.8), (32, 0.5), (40, 0.4), (64, 0.35)):
        wide = make_sae(architecture, d_in=4, d_sae=64, k=k, **wide_options)
        torch.testing.assert_close(wide.W_enc, wide.W_dec.T * scale, rtol=1e-12, atol=0)
    assert torch.equal(make_sae("standard").W_enc, make_sae("standard").W_dec.T)  # not the TopK family's
    with pytest.raises(SAELensError, match="encoder_init_scale"):
        make_sae(architecture, k=2, encoder_init_scale=0, **options)


def test_topk_encode_keeps_exactly_k_and_matches_reference() -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=4), b_enc_shift=20.0)
    x = rand_x(13, 6)
    acts = sae.encode(x)
    assert ((acts > 0).sum(dim=-1) == 4).all()
    torch.testing.assert_close(acts, dense_topk_reference(sae, x, 4))
    # The kept latents are the k largest pre-activations.
    pre = sae.encode_pre(x)
    kept_min = torch.where(acts > 0, pre, torch.inf).min(dim=-1).values
    dropped_max = torch.where(acts > 0, -torch.inf, pre).max(dim=-1).values
    assert (kept_min > dropped_max).all()


def test_topk_negative_preacts_are_zeroed() -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=4), b_enc_shift=-3.0)
    x = rand_x(13, 6)
    acts = sae.encode(x)
    assert ((acts > 0).sum(dim=-1) <= 4).all()
    assert (acts >= 0).all()
    torch.testing.assert_close(acts, dense_topk_reference(sae, x, 4))


@pytest.mark.parametrize("backend", ["auto", "csr", "index"])
def test_topk_training_forward_pass_matches_dense_forward(backend: str) -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3))
    sae.kernel_backend = backend
    x = rand_x(17, 6)
    out = sae.training_forward_pass(x)
    torch.testing.assert_close(out.sae_out, sae(x))
    # Training reports TopK latents sparsely, so no [batch, d_sae] tensor is written per step.
    assert out.feature_acts.is_sparse
    torch.testing.assert_close(out.feature_acts.to_dense(), sae.encode(x).detach())
    expected_mse = sum(float(((out.sae_out[t].detach() - x[t]) ** 2).sum()) for t in range(17)) / 17
    assert out.mse_loss.item() == pytest.approx(expected_mse, rel=1e-10)
    assert out.l1_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(expected_mse, rel=1e-10)

    # Gradients of the sparse path equal those of the dense formulation.
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    sparse_grads = torch.autograd.grad(out.mse_loss, params)
    dense_mse = ((sae(x) - x) ** 2).sum(dim=-1).mean()
    dense_grads = torch.autograd.grad(dense_mse, params)
    for got, want in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_topk_has_no_sparsity_coefficient() -> None:
    sae = make_sae("topk", d_in=6, d_sae=12, k=3)
    assert sae.sparsity_coefficient is None
    # A coefficient passed in anyway changes nothing: TopK has no penalty term.
    x = rand_x(8, 6)
    assert set(sae.training_forward_pass(x, l1_coefficient=5.0).losses) == {"mse"}


@pytest.mark.parametrize("k", [None, 0, 13])
def test_topk_rejects_bad_k(k: int | None) -> None:
    with pytest.raises(SAELensError, match="k"):
        make_sae("topk", d_in=6, d_sae=12, k=k)


def test_fold_W_dec_norm_is_a_no_op_only_at_unit_norm() -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3))
    sae.set_decoder_norm_to_unit_norm()
    x = rand_x(9, 6)
    before = sae(x).detach()
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x).detach(), before)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    with pytest.raises(SAELensError, match="fold_W_dec_norm"):
        sae.fold_W_dec_norm()
