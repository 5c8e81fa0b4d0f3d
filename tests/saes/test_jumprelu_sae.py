"""JumpReLU SAE: forward maths and STE gradients by hand, penalties, state dict and SAELens-6 files,
weight folding, and a short training run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sae_lens.errors import SAELensError
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, jumprelu, step
from sae_lens.saes.sae import SparseAutoencoder
from tests.conftest import make_runner_config, make_sae_config

F64 = torch.float64


def make_sae(d_in: int = 2, d_sae: int = 3, dtype: str = "float64", seed: int = 0, **kw: Any) -> JumpReLUSAE:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(make_sae_config("jumprelu", d_in, d_sae, dtype=dtype, **kw))
    assert isinstance(sae, JumpReLUSAE)
    return sae


def hand_sae(**kw: Any) -> JumpReLUSAE:
    """d_in=2, d_sae=3 with the weights of the hand computations; set through `load_state_dict`,
    which also exercises the threshold -> log_threshold conversion."""
    sae = make_sae(**kw)
    sae.load_state_dict(
        {
            "W_enc": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]], dtype=F64),
            "b_enc": torch.tensor([0.0, -1.0, 0.5], dtype=F64),
            # Row 2 has norm sqrt(2), so the decoder-norm weighting of the tanh penalty shows.
            "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64),
            "b_dec": torch.tensor([0.5, -0.5], dtype=F64),
            "threshold": torch.tensor([0.6, 0.5, 2.0], dtype=F64),
        }
    )
    return sae


HAND_X = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=F64)
# sae_in = x - b_dec = [[0.5, 2.5], [2.5, 0.5]]
# pre = sae_in @ W_enc + b_enc = [[0.5, 1.5, -1.5], [2.5, -0.5, 2.5]]
# fires (pre > θ = [0.6, 0.5, 2.0]): [[F, T, F], [T, F, T]]   (0.5 > 0 but below 0.6: zeroed)
HAND_PRE = torch.tensor([[0.5, 1.5, -1.5], [2.5, -0.5, 2.5]], dtype=F64)
HAND_F = torch.tensor([[0.0, 1.5, 0.0], [2.5, 0.0, 2.5]], dtype=F64)  # f = pre, no ReLU shift
# out = f @ W_dec + b_dec: [0, 1.5] + b_dec = [0.5, 1.0]; [2.5 + 2.5, 2.5] + b_dec = [5.5, 2.0]
HAND_OUT = torch.tensor([[0.5, 1.0], [5.5, 2.0]], dtype=F64)
# errors: [-0.5, -1.0] -> 1.25; [2.5, 2.0] -> 10.25; mean 5.75
HAND_MSE = 5.75


def rand_sae(d_in: int = 6, d_sae: int = 10, dtype: str = "float64", seed: int = 1, **kw: Any) -> JumpReLUSAE:
    """Random weights, decoder rows of varied norm, thresholds in [0.2, 1.2]."""
    sae = make_sae(d_in=d_in, d_sae=d_sae, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            p = getattr(sae, name)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=gen, dtype=F64) * 2 + 0.5)
        sae.log_threshold.copy_(torch.log(torch.rand(d_sae, generator=gen, dtype=F64) + 0.2))
    return sae


def rand_x(n: int, d: int, seed: int = 2, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- construction -------------------------------------------------------------------------------


def test_registered_and_initialised() -> None:
    sae = make_sae(d_in=4, d_sae=8, dtype="float32", jumprelu_init_threshold=0.25)
    assert type(sae) is JumpReLUSAE and sae.architecture_name == "jumprelu"
    assert JumpReLUSAE.normalize_decoder is False
    torch.testing.assert_close(sae.threshold, torch.full((8,), 0.25))
    assert sae.threshold.dtype == torch.float32
    assert sae.log_threshold.dtype == torch.float64  # makes the threshold round trip exact


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("jumprelu_sparsity_loss_mode", "l1", "jumprelu_sparsity_loss_mode"),
        ("jumprelu_bandwidth", 0.0, "jumprelu_bandwidth"),
        ("jumprelu_init_threshold", -1.0, "jumprelu_init_threshold"),
        ("target_l0", 0.0, "target_l0"),
    ],
)
def test_bad_config_is_rejected(field: str, value: Any, match: str) -> None:
    with pytest.raises(SAELensError, match=match):
        make_sae(**{field: value})


# -- forward ------------------------------------------------------------------------------------


def test_forward_by_hand() -> None:
    sae = hand_sae()
    torch.testing.assert_close(sae.encode_pre(HAND_X), HAND_PRE)
    torch.testing.assert_close(sae.encode(HAND_X), HAND_F)
    torch.testing.assert_close(sae(HAND_X), HAND_OUT)
    _, cache = sae.run_with_cache(HAND_X)
    torch.testing.assert_close(cache["hook_hidden_pre"], HAND_PRE)
    torch.testing.assert_close(cache["hook_hidden_post"], HAND_F)


def test_forward_without_b_dec_on_input() -> None:
    sae = hand_sae(apply_b_dec_to_input=False)
    # pre = x @ W_enc + b_enc = [[1, 1, -0.5], [3, -1, 3.5]]; θ = [0.6, 0.5, 2.0]
    # f = [[1, 1, 0], [3, 0, 3.5]]; out = [[1, 1], [6.5, 3.5]] + b_dec
    torch.testing.assert_close(
        sae.encode(HAND_X), torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 3.5]], dtype=F64)
    )
    torch.testing.assert_close(sae(HAND_X), torch.tensor([[1.5, 0.5], [7.0, 3.0]], dtype=F64))


# -- straight-through estimators ----------------------------------------------------------------

# θ = 2, ε = 0.2: the rectangle window is |x - θ| < 0.1.
# 2.09 and 1.91 are just inside it, 2.11 and 1.89 just outside.
STE_X = torch.tensor([[2.09], [1.91], [2.11], [1.89]], dtype=F64)
STE_G = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=F64)


def test_jumprelu_ste_by_hand() -> None:
    x = STE_X.clone().requires_grad_()
    theta = torch.tensor([2.0], dtype=F64, requires_grad=True)
    out = jumprelu(x, theta, 0.2)
    torch.testing.assert_close(out, torch.tensor([[2.09], [0.0], [2.11], [0.0]], dtype=F64))
    out.backward(STE_G)
    # d/dx = H(x - θ) g = [1, 0, 3, 0]
    torch.testing.assert_close(x.grad, torch.tensor([[1.0], [0.0], [3.0], [0.0]], dtype=F64))
    # d/dθ = -(θ/ε) Σ_inside g = -(2 / 0.2) (1 + 2) = -30; 2.11 and 1.89 (outside) add nothing
    torch.testing.assert_close(theta.grad, torch.tensor([-30.0], dtype=F64))


def test_step_ste_by_hand() -> None:
    x = STE_X.clone().requires_grad_()
    theta = torch.tensor([2.0], dtype=F64, requires_grad=True)
    out = step(x, theta, 0.2)
    torch.testing.assert_close(out, torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=F64))
    (g_x, g_theta) = torch.autograd.grad(out, [x, theta], STE_G, materialize_grads=True)
    torch.testing.assert_close(g_x, torch.zeros_like(g_x))  # no gradient to x
    # d/dθ = -(1/ε) Σ_inside g = -(1 / 0.2) (1 + 2) = -15
    torch.testing.assert_close(g_theta, torch.tensor([-15.0], dtype=F64))


def test_ste_window_edges() -> None:
    theta = torch.tensor([2.0], dtype=F64, requires_grad=True)
    for value, expected in [(2.09, -5.0), (2.11, 0.0), (1.91, -5.0), (1.89, 0.0)]:
        (g,) = torch.autograd.grad(step(torch.tensor([[value]], dtype=F64), theta, 0.2).sum(), theta)
        assert g.item() == pytest.approx(expected), value


def test_ste_per_latent_thresholds_sum_over_batch() -> None:
    # Thresholds [0, 1, 2] broadcast over 3 tokens; ε = 1 so the window is |x - θ| < 0.5.
    x = torch.tensor([[0.2, 1.7, 2.3], [-0.3, 0.6, 5.0], [0.9, 1.1, 1.8]], dtype=F64)
    theta = torch.tensor([0.0, 1.0, 2.0], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(step(x, theta, 1.0).sum(), theta)
    # inside per latent: latent 0 {0.2, -0.3} -> -2; latent 1 {0.6, 1.1} -> -2; latent 2 {2.3, 1.8} -> -2
    torch.testing.assert_close(g, torch.tensor([-2.0, -2.0, -2.0], dtype=F64))
    (g,) = torch.autograd.grad(jumprelu(x, theta, 1.0).sum(), theta)
    torch.testing.assert_close(g, torch.tensor([0.0, -2.0, -4.0], dtype=F64))  # scaled by θ


def test_step_ste_is_the_finite_difference_over_one_bandwidth() -> None:
    # With the rectangle kernel, -(1/ε) #{|x - θ| < ε/2} is exactly the change in the count when θ
    # moves from θ - ε/2 to θ + ε/2, divided by ε.
    x = rand_x(2000, 5, seed=3)
    theta = torch.tensor([-0.5, 0.0, 0.3, 1.0, 2.0], dtype=F64, requires_grad=True)
    eps = 0.25
    (g,) = torch.autograd.grad(step(x, theta, eps).sum(), theta)
    with torch.no_grad():
        finite = ((x > theta + eps / 2).sum(0) - (x > theta - eps / 2).sum(0)).to(F64) / eps
    torch.testing.assert_close(g, finite)
    assert (g < 0).all()


def test_jumprelu_input_gradient_matches_autograd_of_masked_identity() -> None:
    x = rand_x(50, 4, seed=4).requires_grad_()
    theta = torch.tensor([0.1, 0.5, -0.2, 1.0], dtype=F64)
    g = rand_x(50, 4, seed=5)
    (ours,) = torch.autograd.grad(jumprelu(x, theta, 0.1), x, g)
    (ref,) = torch.autograd.grad(x * (x > theta).to(F64), x, g)
    torch.testing.assert_close(ours, ref)


# -- penalties ----------------------------------------------------------------------------------


def test_step_penalty_by_hand() -> None:
    sae = hand_sae(jumprelu_sparsity_loss_mode="step")
    out = sae.training_forward_pass(HAND_X, l1_coefficient=0.1)
    torch.testing.assert_close(out.feature_acts, HAND_F)
    torch.testing.assert_close(out.sae_out, HAND_OUT)
    assert out.mse_loss.item() == pytest.approx(HAND_MSE)
    # L0 per token: 1 and 2 -> mean 1.5 -> 0.1 * 1.5
    assert out.l1_loss.item() == pytest.approx(0.15)
    assert out.ghost_grad_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(HAND_MSE + 0.15)
    # Without an explicit coefficient the config's is used; without hidden_pre, the same count.
    assert sae.training_forward_pass(HAND_X).l1_loss.item() == pytest.approx(1.5 * sae.cfg.l1_coefficient)
    assert sae.sparsity_penalty(HAND_F).item() == pytest.approx(1.5)


def test_tanh_penalty_by_hand() -> None:
    sae = hand_sae(jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=0.5)
    out = sae.training_forward_pass(HAND_X, l1_coefficient=0.1)
    # Σ tanh(0.5 f ‖W_dec‖), ‖W_dec‖ = [1, 1, √2]:
    # token 0: tanh(0.5 · 1.5); token 1: tanh(0.5 · 2.5) + tanh(0.5 · 2.5 · √2)
    per_token = [math.tanh(0.75), math.tanh(1.25) + math.tanh(1.25 * math.sqrt(2))]
    assert out.l1_loss.item() == pytest.approx(0.1 * sum(per_token) / 2)
    assert out.loss.item() == pytest.approx(HAND_MSE + 0.1 * sum(per_token) / 2)


def test_target_l0_penalty_by_hand() -> None:
    # target_l0 overrides the mode: 0.1 · (L0 / 3 - 1)² with L0 = 1.5 -> 0.1 · 0.25
    for mode in ("step", "tanh"):
        sae = hand_sae(jumprelu_sparsity_loss_mode=mode, target_l0=3.0)
        out = sae.training_forward_pass(HAND_X, l1_coefficient=0.1)
        assert out.l1_loss.item() == pytest.approx(0.025)
    sae = hand_sae(target_l0=1.0)  # above target is penalised too: (1.5 / 1 - 1)² = 0.25
    assert sae.training_forward_pass(HAND_X, l1_coefficient=0.1).l1_loss.item() == pytest.approx(0.025)


def test_threshold_gradient_by_hand() -> None:
    # ε = 0.3: only token 0, latent 0 (pre 0.5, θ 0.6) lies in the window |pre - θ| < 0.15.
    # MSE through JumpReLU: ∂MSE/∂f[0] = (2/N)(out0 - x0) @ W_dec.T = [-0.5, -1, -1.5];
    #   d/dθ0 = -(θ0/ε) · (-0.5) = -(0.6/0.3)(-0.5) = 1
    # step penalty: c · (1/N) · -(1/ε) = 0.1 · 0.5 · (-1/0.3)
    # d/dlog θ0 = θ0 · d/dθ0 = 0.6 · (1 - 0.1 · 0.5 / 0.3) = 0.6 - 0.1
    sae = hand_sae(jumprelu_bandwidth=0.3)
    sae.training_forward_pass(HAND_X, l1_coefficient=0.1).loss.backward()
    assert sae.log_threshold.grad is not None
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([0.5, 0.0, 0.0], dtype=F64))
    # ε = 0.1: the same token is outside the window (|0.5 - 0.6| > 0.05): no gradient at all
    sae = hand_sae(jumprelu_bandwidth=0.1)
    sae.training_forward_pass(HAND_X, l1_coefficient=0.1).loss.backward()
    assert sae.log_threshold.grad is not None
    torch.testing.assert_close(sae.log_threshold.grad, torch.zeros(3, dtype=F64))


def test_target_l0_threshold_gradient_by_hand() -> None:
    # d/dθ0 of c (L0/t - 1)² = c · 2 (L0/t - 1)/t · dL0/dθ0, dL0/dθ0 = (1/N) · -(1/ε) = -1/0.6
    # with c = 1, t = 3, L0 = 1.5: 2 · (-0.5) / 3 · (-1/0.6) = 1/1.8; times θ0 = 0.6 -> 1/3
    sae = hand_sae(jumprelu_bandwidth=0.3, target_l0=3.0)
    out = sae.training_forward_pass(HAND_X, l1_coefficient=1.0)
    (g,) = torch.autograd.grad(out.l1_loss, sae.log_threshold)
    torch.testing.assert_close(g, torch.tensor([1 / 3, 0.0, 0.0], dtype=F64))


@pytest.mark.parametrize("mode", ["step", "tanh", "target"])
def test_training_gradients_match_an_autograd_reference(mode: str) -> None:
    kw: dict[str, Any] = {"jumprelu_bandwidth": 0.8, "jumprelu_tanh_scale": 2.0}
    kw |= {"target_l0": 2.0} if mode == "target" else {"jumprelu_sparsity_loss_mode": mode}
    sae = rand_sae(**kw)
    x = rand_x(40, 6)
    coef = 0.3
    out = sae.training_forward_pass(x, l1_coefficient=coef)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.log_threshold]
    grads = torch.autograd.grad(out.loss, params)

    # Reference in plain autograd: JumpReLU's input gradient is that of pre * mask; the step
    # count sends nothing to the weights; the threshold gradient is assembled from the formulas.
    theta = torch.exp(sae.log_threshold).detach()
    eps, n = 0.8, x.shape[0]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    mask = (pre > theta).to(F64)
    f = pre * mask
    f_leaf = f.detach().requires_grad_()
    norms = sae.W_dec.norm(dim=-1)
    ref_mse = ((f_leaf @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    ref_loss = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    kernel = ((pre.detach() - theta).abs() < eps / 2).to(F64)
    l0 = mask.sum(-1).mean()
    if mode == "tanh":
        ref_mse = ref_mse + coef * torch.tanh(2.0 * f_leaf * norms.detach()).sum(-1).mean()
        ref_loss = ref_loss + coef * torch.tanh(2.0 * f * norms).sum(-1).mean()
        step_weight = torch.zeros((), dtype=F64)
    elif mode == "step":
        ref_loss = ref_loss + coef * l0
        step_weight = torch.tensor(coef / n, dtype=F64)
    else:
        ref_loss = ref_loss + coef * (l0 / 2.0 - 1) ** 2
        step_weight = torch.tensor(coef * 2 * (l0.item() / 2.0 - 1) / 2.0 / n, dtype=F64)
    ref_grads = torch.autograd.grad(ref_loss, params[:4])
    for ours, ref in zip(grads[:4], ref_grads, strict=True):
        torch.testing.assert_close(ours, ref)
    (g_f,) = torch.autograd.grad(ref_mse, f_leaf)
    d_theta = (-(theta / eps) * kernel * g_f).sum(0) + (-(1 / eps) * kernel * step_weight).sum(0)
    torch.testing.assert_close(grads[4], theta * d_theta)
    assert kernel.sum() > 0 and grads[4].abs().sum() > 0
    assert out.loss.item() == pytest.approx(ref_loss.item())


# -- state dict, saving and loading -------------------------------------------------------------


def test_state_dict_holds_threshold_not_log_threshold() -> None:
    sae = rand_sae(dtype="float32")
    # The base creates W_enc, W_dec, b_dec, then each architecture its own encoder parameters.
    assert list(sae.state_dict()) == ["W_enc", "W_dec", "b_dec", "b_enc", "threshold"]
    assert "log_threshold" in dict(sae.named_parameters())
    torch.testing.assert_close(sae.state_dict()["threshold"], sae.threshold)
    assert not sae.state_dict()["threshold"].requires_grad
    assert sae.state_dict(keep_vars=True)["threshold"].requires_grad


def test_load_state_dict_is_exact_and_in_place() -> None:
    sae = rand_sae(dtype="float32")
    param = sae.log_threshold
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.load_state_dict(state)
    assert sae.log_threshold is param  # the optimiser's reference stays valid
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # a state dict in training form (log_threshold) loads too
    other = make_sae(d_in=6, d_sae=10, dtype="float32")
    other.load_state_dict({**{k: v for k, v in state.items() if k != "threshold"}, "log_threshold": param})
    assert torch.equal(other.threshold, sae.threshold)


def test_zero_and_negative_thresholds() -> None:
    sae = hand_sae()
    state = sae.state_dict()
    sae.load_state_dict({**state, "threshold": torch.zeros(3, dtype=F64)})
    assert torch.equal(sae.threshold, torch.zeros(3, dtype=F64))
    # θ = 0: every positive pre-activation fires: [[0.5, 1.5, 0], [2.5, 0, 2.5]]
    torch.testing.assert_close(sae.encode(HAND_X), torch.relu(HAND_PRE))
    with pytest.raises(SAELensError, match="non-negative"):
        sae.load_state_dict({**state, "threshold": torch.tensor([0.1, -0.1, 0.1], dtype=F64)})


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    sae = rand_sae(dtype="float32", jumprelu_sparsity_loss_mode="tanh", target_l0=7.0)
    folder = sae.save_model(tmp_path / "sae")
    loaded = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(loaded, JumpReLUSAE)
    assert loaded.cfg == sae.cfg
    assert list(loaded.state_dict()) == list(sae.state_dict())
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
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
        "threshold": torch.rand(d_sae, generator=gen) * 0.9 + 0.05,
    }
    folder = tmp_path / "gemma-scope-like"
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
            "dataset_path": "monology/pile-uncopyrighted",
            "sae_lens_version": "6.5.0",
        },
        "architecture": "jumprelu",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))

    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, JumpReLUSAE)
    assert sae.cfg.metadata["hook_name"] == "blocks.12.hook_resid_post"
    assert sae.cfg.metadata["model_name"] == "gemma-2-2b"
    for name, tensor in raw.items():
        assert torch.equal(sae.state_dict()[name], tensor), name  # thresholds bit for bit

    x = torch.randn(64, d_in, generator=gen)
    pre = (x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"]
    f = pre * (pre > raw["threshold"]).float()
    assert 0 < (f != 0).float().mean() < 1
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.decode(f), f @ raw["W_dec"] + raw["b_dec"])
        torch.testing.assert_close(sae(x), f @ raw["W_dec"] + raw["b_dec"])


# -- weight folding -----------------------------------------------------------------------------


def test_fold_W_dec_norm_keeps_outputs() -> None:
    sae = rand_sae()
    x = rand_x(64, 6)
    with torch.no_grad():
        before_f, before_out = sae.encode(x), sae(x)
        norms = sae.W_dec.norm(dim=-1)
        theta = sae.threshold.clone()
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10, dtype=F64))
        torch.testing.assert_close(sae.threshold, theta * norms)
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


@pytest.mark.parametrize("target_l0", [None, 4.0])
def test_training_learns_a_sparse_code(target_l0: float | None, train_on_sparse_data: Any) -> None:
    cfg = make_runner_config(
        architecture="jumprelu",
        d_in=16,
        d_sae=64,
        lr=1e-2,
        l1_coefficient=0.1 if target_l0 is None else 1.0,
        target_l0=target_l0,
        jumprelu_init_threshold=0.1,
        jumprelu_bandwidth=0.05,
        train_batch_size=256,
        total_training_tokens=300 * 256,
    )
    sae, before, after = train_on_sparse_data(cfg)
    assert isinstance(sae, JumpReLUSAE)
    ev_before, ev_after, l0_before, l0_after = before["ev"], after["ev"], before["l0"], after["l0"]
    assert ev_after > 0.8 and ev_after > ev_before + 1.0, (ev_before, ev_after)
    assert l0_after < 64 / 2 and l0_after < l0_before / 2.5, (l0_before, l0_after)
    if target_l0 is not None:
        assert abs(l0_after - target_l0) < 2.0
    # The decoder was not renormalised (normalize_decoder is False).
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-3)
