"""Gated SAE: gate and magnitude paths and every loss term by hand, the frozen-decoder auxiliary
loss, SAELens-6 parameter names and files, weight folding, and a short training run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sae_lens.saes.gated_sae import GatedSAE
from sae_lens.saes.sae import SparseAutoencoder
from tests.conftest import make_runner_config, make_sae_config

F64 = torch.float64
SAELENS_GATED_KEYS = {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}


def make_sae(d_in: int = 2, d_sae: int = 3, dtype: str = "float64", seed: int = 0, **kw: Any) -> GatedSAE:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(make_sae_config("gated", d_in, d_sae, dtype=dtype, **kw))
    assert isinstance(sae, GatedSAE)
    return sae


def hand_sae(**kw: Any) -> GatedSAE:
    """d_in=2, d_sae=3 with the weights of the hand computations below."""
    sae = make_sae(**kw)
    sae.load_state_dict(
        {
            "W_enc": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]], dtype=F64),
            "b_gate": torch.tensor([0.0, -1.0, 0.5], dtype=F64),
            "r_mag": torch.tensor([0.0, math.log(2.0), 0.0], dtype=F64),
            "b_mag": torch.tensor([-1.0, 0.0, -1.0], dtype=F64),
            # Row 2 has norm sqrt(2), so the decoder-norm weighting of the L1 term shows.
            "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64),
            "b_dec": torch.tensor([0.5, -0.5], dtype=F64),
        }
    )
    return sae


HAND_X = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=F64)
# sae_in = x - b_dec = [[0.5, 2.5], [2.5, 0.5]];  sae_in @ W_enc = [[0.5, 2.5, -2], [2.5, 0.5, 2]]
# π_gate = + b_gate = [[0.5, 1.5, -1.5], [2.5, -0.5, 2.5]]  -> open [[T, T, F], [T, F, T]]
HAND_GATE = torch.tensor([[0.5, 1.5, -1.5], [2.5, -0.5, 2.5]], dtype=F64)
# W_enc * exp(r_mag) doubles column 1: sae_in @ it = [[0.5, 5, -2], [2.5, 1, 2]]
# π_mag = + b_mag = [[-0.5, 5, -3], [1.5, 1, 1]]
HAND_MAG = torch.tensor([[-0.5, 5.0, -3.0], [1.5, 1.0, 1.0]], dtype=F64)
# f = open * relu(π_mag): token 0 latent 0 is open but its magnitude is negative -> 0;
# token 1 latent 1 has a positive magnitude but a closed gate -> 0.
HAND_F = torch.tensor([[0.0, 5.0, 0.0], [1.5, 0.0, 1.0]], dtype=F64)
# out = f @ W_dec + b_dec = [[0, 5], [2.5, 1]] + b_dec
HAND_OUT = torch.tensor([[0.5, 4.5], [3.0, 0.5]], dtype=F64)
# MSE: [-0.5, 2.5] -> 6.5; [0, 0.5] -> 0.25; mean 3.375
HAND_MSE = 3.375
# L1 of relu(π_gate) = [[0.5, 1.5, 0], [2.5, 0, 2.5]] weighted by ‖W_dec‖ = [1, 1, √2]:
# token 0: 2; token 1: 2.5 + 2.5√2; mean (4.5 + 2.5√2) / 2
HAND_L1 = (4.5 + 2.5 * math.sqrt(2)) / 2
# aux: relu(π_gate) @ W_dec + b_dec = [[0.5, 1.5], [5, 2.5]] + b_dec = [[1, 1], [5.5, 2]]
# errors: [0, -1] -> 1; [2.5, 2] -> 10.25; mean 5.625
HAND_AUX = 5.625


def rand_sae(d_in: int = 6, d_sae: int = 10, dtype: str = "float64", seed: int = 1, **kw: Any) -> GatedSAE:
    """Random weights, decoder rows of varied norm."""
    sae = make_sae(d_in=d_in, d_sae=d_sae, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        sae.r_mag.mul_(0.5)
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=gen, dtype=F64) * 2 + 0.5)
    return sae


def rand_x(n: int, d: int, seed: int = 2, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- construction -------------------------------------------------------------------------------


def test_parameters_match_saelens_names() -> None:
    sae = make_sae(d_in=4, d_sae=8, dtype="float32")
    assert type(sae) is GatedSAE and sae.architecture_name == "gated"
    assert GatedSAE.normalize_decoder is True
    assert set(sae.state_dict()) == SAELENS_GATED_KEYS
    assert {name for name, _ in sae.named_parameters()} == SAELENS_GATED_KEYS
    assert not hasattr(sae, "b_enc")
    shapes = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    assert shapes == {
        "W_enc": (4, 8),
        "b_gate": (8,),
        "r_mag": (8,),
        "b_mag": (8,),
        "W_dec": (8, 4),
        "b_dec": (4,),
    }
    for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
        assert torch.count_nonzero(sae.state_dict()[name]) == 0, name
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


# -- forward ------------------------------------------------------------------------------------


def test_gate_and_magnitude_by_hand() -> None:
    sae = hand_sae()
    pi_gate, pi_mag = sae.gate_and_magnitude_pre(HAND_X)
    torch.testing.assert_close(pi_gate, HAND_GATE)
    torch.testing.assert_close(pi_mag, HAND_MAG)
    torch.testing.assert_close(sae.encode_pre(HAND_X), HAND_MAG)
    torch.testing.assert_close(sae.encode(HAND_X), HAND_F)
    torch.testing.assert_close(sae(HAND_X), HAND_OUT)
    _, cache = sae.run_with_cache(HAND_X)
    torch.testing.assert_close(cache["hook_hidden_pre"], HAND_MAG)
    torch.testing.assert_close(cache["hook_hidden_post"], HAND_F)


def test_forward_without_b_dec_on_input() -> None:
    sae = hand_sae(apply_b_dec_to_input=False)
    # π_gate = x @ W_enc + b_gate = [[1, 1, -1.5], [3, -1, 3.5]] -> open [[T, T, F], [T, F, T]]
    # π_mag = x @ (W_enc * exp(r_mag)) + b_mag = [[0, 4, -2], [2, 0, 2]]
    # f = [[0, 4, 0], [2, 0, 2]]; out = [[0, 4], [4, 2]] + b_dec
    torch.testing.assert_close(
        sae.encode(HAND_X), torch.tensor([[0.0, 4.0, 0.0], [2.0, 0.0, 2.0]], dtype=F64)
    )
    torch.testing.assert_close(sae(HAND_X), torch.tensor([[0.5, 3.5], [4.5, 1.5]], dtype=F64))


# -- losses -------------------------------------------------------------------------------------


def test_each_loss_term_by_hand() -> None:
    sae = hand_sae()
    out = sae.training_forward_pass(HAND_X, l1_coefficient=0.1)
    torch.testing.assert_close(out.feature_acts, HAND_F)
    torch.testing.assert_close(out.sae_out, HAND_OUT)
    assert out.mse_loss.item() == pytest.approx(HAND_MSE)
    assert out.l1_loss.item() == pytest.approx(0.1 * HAND_L1)
    assert out.ghost_grad_loss.item() == pytest.approx(HAND_AUX)
    assert out.loss.item() == pytest.approx(HAND_MSE + 0.1 * HAND_L1 + HAND_AUX)
    default = sae.training_forward_pass(HAND_X)  # the config's coefficient
    assert default.l1_loss.item() == pytest.approx(sae.cfg.l1_coefficient * HAND_L1)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_aux_loss_gradient_skips_the_decoder(apply_b_dec: bool) -> None:
    sae = rand_sae(apply_b_dec_to_input=apply_b_dec)
    x = rand_x(40, 6)
    out = sae.training_forward_pass(x, l1_coefficient=0.3)
    names = ["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"]
    params = [getattr(sae, n) for n in names]
    grads = dict(zip(names, torch.autograd.grad(out.ghost_grad_loss, params, allow_unused=True), strict=True))
    for name in ("W_dec", "r_mag", "b_mag"):
        assert grads[name] is None, name  # not even a zero: the graph has no path
    if apply_b_dec:
        # b_dec's path through π_gate is cancelled by a zero-valued term (no second matmul), so
        # its gradient is zero up to rounding.
        assert grads["b_dec"] is not None
        torch.testing.assert_close(grads["b_dec"], torch.zeros_like(sae.b_dec), atol=1e-12, rtol=0)
    else:
        assert grads["b_dec"] is None
    # It trains the gate encoder exactly as a loss on frozen decoder copies would.
    W_dec, b_dec = sae.W_dec.detach().clone(), sae.b_dec.detach().clone()
    sae_in = x - b_dec if apply_b_dec else x
    via_gate = torch.relu(sae_in @ sae.W_enc + sae.b_gate) @ W_dec + b_dec
    reference = ((via_gate - x) ** 2).sum(-1).mean()
    ref_W_enc, ref_b_gate = torch.autograd.grad(reference, [sae.W_enc, sae.b_gate])
    assert grads["W_enc"] is not None and grads["b_gate"] is not None
    torch.testing.assert_close(grads["W_enc"], ref_W_enc)
    torch.testing.assert_close(grads["b_gate"], ref_b_gate)
    assert torch.count_nonzero(ref_b_gate) > 0
    assert out.ghost_grad_loss.item() == pytest.approx(reference.item())


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_total_gradient_matches_an_autograd_reference(apply_b_dec: bool) -> None:
    sae = rand_sae(apply_b_dec_to_input=apply_b_dec)
    x = rand_x(40, 6)
    params = [sae.W_enc, sae.b_gate, sae.r_mag, sae.b_mag, sae.W_dec, sae.b_dec]
    out = sae.training_forward_pass(x, l1_coefficient=0.3)
    grads = torch.autograd.grad(out.loss, params)

    sae_in = x - sae.b_dec if apply_b_dec else x
    pi_gate = sae_in @ sae.W_enc + sae.b_gate
    pi_mag = sae_in @ (sae.W_enc * torch.exp(sae.r_mag)) + sae.b_mag
    f = (pi_gate > 0).to(F64) * torch.relu(pi_mag)
    mse = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    l1 = 0.3 * (torch.relu(pi_gate) * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    frozen_in = x - sae.b_dec.detach() if apply_b_dec else x
    via_gate = torch.relu(frozen_in @ sae.W_enc + sae.b_gate) @ sae.W_dec.detach() + sae.b_dec.detach()
    aux = ((via_gate - x) ** 2).sum(-1).mean()
    for ours, ref in zip(grads, torch.autograd.grad(mse + l1 + aux, params), strict=True):
        torch.testing.assert_close(ours, ref)
    assert out.loss.item() == pytest.approx((mse + l1 + aux).item())


# -- saving and loading -------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    sae = rand_sae(dtype="float32", l1_coefficient=0.7)
    folder = sae.save_model(tmp_path / "sae")
    loaded = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(loaded, GatedSAE)
    assert loaded.cfg == sae.cfg
    assert set(loaded.state_dict()) == SAELENS_GATED_KEYS
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = rand_x(20, 6, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x), sae(x))


def test_loads_a_saelens_6_folder_written_by_hand(tmp_path: Path) -> None:
    d_in, d_sae = 5, 8
    gen = torch.Generator().manual_seed(7)
    raw = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_gate": torch.randn(d_sae, generator=gen) * 0.5,
        "r_mag": torch.randn(d_sae, generator=gen) * 0.3,
        "b_mag": torch.randn(d_sae, generator=gen) * 0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }
    folder = tmp_path / "gated-6x"
    folder.mkdir()
    save_file(raw, str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gemma-2-2b",
            "hook_name": "blocks.12.hook_resid_post",
            "hook_head_index": None,
            "context_size": 1024,
            "prepend_bos": True,
            "sae_lens_version": "6.5.0",
        },
        "architecture": "gated",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))

    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, GatedSAE)
    assert sae.cfg.metadata["hook_name"] == "blocks.12.hook_resid_post"
    for name, tensor in raw.items():
        assert torch.equal(sae.state_dict()[name], tensor), name

    x = torch.randn(64, d_in, generator=gen)
    sae_in = x - raw["b_dec"]
    gate = (sae_in @ raw["W_enc"] + raw["b_gate"]) > 0
    magnitude = torch.relu(sae_in @ (raw["W_enc"] * torch.exp(raw["r_mag"])) + raw["b_mag"])
    f = gate.float() * magnitude
    assert 0 < (f != 0).float().mean() < 1
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.decode(f), f @ raw["W_dec"] + raw["b_dec"])
        torch.testing.assert_close(sae(x), f @ raw["W_dec"] + raw["b_dec"])


# -- weight folding -----------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_W_dec_norm_keeps_outputs(apply_b_dec: bool) -> None:
    sae = rand_sae(apply_b_dec_to_input=apply_b_dec)
    x = rand_x(64, 6)
    with torch.no_grad():
        before_f, before_out = sae.encode(x), sae(x)
        norms = sae.W_dec.norm(dim=-1)
        r_mag = sae.r_mag.clone()
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10, dtype=F64))
        assert torch.equal(sae.r_mag, r_mag)
        torch.testing.assert_close(sae.encode(x), before_f * norms)
        torch.testing.assert_close(sae(x), before_out)
    assert 0 < (before_f != 0).float().mean() < 1


def test_fold_activation_norm_scaling_factor_keeps_outputs() -> None:
    sae = rand_sae()
    x = rand_x(64, 6)
    with torch.no_grad():
        trained_on_scaled = sae(x * 3.0) / 3.0
        sae.fold_activation_norm_scaling_factor(3.0)
        torch.testing.assert_close(sae(x), trained_on_scaled)


# -- training -----------------------------------------------------------------------------------


def test_training_learns_a_sparse_code(train_on_sparse_data: Any) -> None:
    cfg = make_runner_config(
        architecture="gated",
        d_in=16,
        d_sae=64,
        lr=1e-2,
        l1_coefficient=0.5,
        train_batch_size=256,
        total_training_tokens=300 * 256,
    )
    sae, before, after = train_on_sparse_data(cfg)
    assert isinstance(sae, GatedSAE)
    assert after["ev"] > 0.8 and after["ev"] > before["ev"] + 1.0, (before, after)
    assert after["l0"] < before["l0"] / 2, (before, after)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))  # kept at unit norm
