"""The standard SAE (sae_lens/saes/standard_sae.py): its L1 training losses by hand, ghost grads
against a token-by-token reference, and the fused ReLU step against plain autograd."""

from __future__ import annotations

import math

import pytest
import torch

from sae_lens.saes import SparseAutoencoder, StandardSAEConfig
from sae_lens.saes.standard_sae import ghost_grads_loss
from tests.saes.helpers import F64, HAND_X, hand_sae, make_sae, rand_x, randomise

# -- training losses ----------------------------------------------------------------------------------


def test_config_options_and_defaults() -> None:
    cfg = StandardSAEConfig(d_in=4, d_sae=8)
    assert (cfg.l1_coefficient, cfg.lp_norm, cfg.use_ghost_grads) == (1e-3, 1.0, False)
    assert cfg.architecture == "standard"


def test_training_losses_by_hand_lp1() -> None:
    sae = hand_sae(l1_coefficient=0.1, lp_norm=1.0)
    out = sae.training_forward_pass(HAND_X)
    # Reconstructions [1, 1] and [5.5, 2] (see above); errors [0, -1] and [2.5, 2]:
    # squared error per token 1 and 6.25 + 4 = 10.25 -> mse = 11.25 / 2 = 5.625.
    assert out.mse_loss.item() == pytest.approx(5.625, rel=1e-12)
    # Decoder row norms [1, 1, sqrt 2]; acts [.5, 1.5, 0] and [2.5, 0, 2.5]:
    # weighted L1 per token 2 and 2.5 + 2.5 sqrt 2 -> mean 2.25 + 1.25 sqrt 2, times 0.1.
    l1 = 0.1 * (2.25 + 1.25 * math.sqrt(2))
    assert out.l1_loss.item() == pytest.approx(l1, rel=1e-12)
    assert out.ghost_grad_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(5.625 + l1, rel=1e-12)
    torch.testing.assert_close(out.sae_out, torch.tensor([[1.0, 1.0], [5.5, 2.0]], dtype=F64))
    torch.testing.assert_close(out.feature_acts, sae.encode(HAND_X))


def test_training_losses_by_hand_lp2_and_coefficient_override() -> None:
    sae = hand_sae(l1_coefficient=0.1, lp_norm=2.0)
    # Weighted acts [.5, 1.5, 0] and [2.5, 0, 2.5 sqrt 2]:
    # L2 norms sqrt(.25 + 2.25) = sqrt 2.5 and sqrt(6.25 + 12.5) = sqrt 18.75.
    penalty = (math.sqrt(2.5) + math.sqrt(18.75)) / 2
    out = sae.training_forward_pass(HAND_X)
    assert out.l1_loss.item() == pytest.approx(0.1 * penalty, rel=1e-12)
    # The trainer passes the warmed-up coefficient, which wins over cfg.
    out = sae.training_forward_pass(HAND_X, l1_coefficient=0.25)
    assert out.l1_loss.item() == pytest.approx(0.25 * penalty, rel=1e-12)
    assert out.loss.item() == pytest.approx(5.625 + 0.25 * penalty, rel=1e-12)
    # The unweighted penalty on its own.
    assert sae.sparsity_penalty(sae.encode(HAND_X)).item() == pytest.approx(penalty, rel=1e-12)


def test_l1_penalty_is_weighted_by_decoder_norms_on_random_sae() -> None:
    sae = randomise(make_sae(l1_coefficient=0.3, lp_norm=1.0), dec_scale=True)
    x = rand_x(7, 6)
    out = sae.training_forward_pass(x)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae(x)
        norms = torch.sqrt((sae.W_dec**2).sum(dim=1))
    expected_l1 = 0.3 * sum((acts[t].abs() * norms).sum() for t in range(7)) / 7
    expected_mse = sum(((recon[t] - x[t]) ** 2).sum() for t in range(7)) / 7
    assert out.l1_loss.item() == pytest.approx(float(expected_l1), rel=1e-10)
    assert out.mse_loss.item() == pytest.approx(float(expected_mse), rel=1e-10)
    # Unweighted would differ: the rows are far from unit norm.
    assert float((acts.abs().sum(-1)).mean() * 0.3) != pytest.approx(out.l1_loss.item(), rel=1e-3)


# -- ghost grads --------------------------------------------------------------------------------------


def ghost_reference(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Ghost-grad loss built token by token from the docstring, differentiable in the parameters.

    Detached, as documented: the residual, the per-token ghost rescaling and the MSE-matching factor.
    """
    sae_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = sae_in @ sae.W_enc + sae.b_enc
    out = torch.relu(pre) @ sae.W_dec + sae.b_dec
    n = x.shape[0]
    mse = sum(((out[t] - x[t]) ** 2).sum() for t in range(n)) / n
    ghost_mse = torch.zeros((), dtype=F64)
    for t in range(n):
        residual = (x[t] - out[t]).detach()
        ghost = torch.zeros_like(residual)
        for i in dead.nonzero().flatten().tolist():
            ghost = ghost + torch.exp(pre[t, i]) * sae.W_dec[i]
        # Rescaled to half the residual's norm (the factor is a constant for the gradient).
        ghost = ghost * (residual.norm() / (2 * ghost.norm() + 1e-6)).detach()
        ghost_mse = ghost_mse + ((ghost - residual) ** 2).sum() / n
    return (mse / (ghost_mse + 1e-6)).detach() * ghost_mse


def test_ghost_grads_value_and_only_dead_latents_get_gradient() -> None:
    sae = randomise(make_sae(use_ghost_grads=True, l1_coefficient=0.0))
    with torch.no_grad():
        sae.W_enc.mul_(0.3)  # keep exp(pre) moderate
    x = rand_x(9, 6)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    out = sae.training_forward_pass(x, dead_neuron_mask=dead)
    reference = ghost_reference(sae, x, dead)
    assert out.ghost_grad_loss.item() > 0
    assert out.ghost_grad_loss.item() == pytest.approx(reference.item(), rel=1e-9)
    assert out.loss.item() == pytest.approx((out.mse_loss + out.l1_loss + out.ghost_grad_loss).item())

    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    g_W_enc, g_b_enc, g_W_dec, g_b_dec = torch.autograd.grad(out.ghost_grad_loss, params)
    # The value is ~ the MSE by construction, so the gradient is what pins the formula down.
    for got, want in zip(
        (g_W_enc, g_b_enc, g_W_dec, g_b_dec), torch.autograd.grad(reference, params), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    live = ~dead
    assert torch.count_nonzero(g_W_enc[:, live]) == 0
    assert torch.count_nonzero(g_b_enc[live]) == 0
    assert torch.count_nonzero(g_W_dec[live]) == 0
    for i in dead.nonzero().flatten().tolist():
        assert g_W_enc[:, i].abs().sum() > 0
        assert g_b_enc[i].abs() > 0
        assert g_W_dec[i].abs().sum() > 0


def test_ghost_grads_loss_function_matches_the_reference() -> None:
    """`ghost_grads_loss(x, sae_out, hidden_pre, W_dec, dead_mask)` computes its own MSE factor."""
    sae = randomise(make_sae(use_ghost_grads=True))
    with torch.no_grad():
        sae.W_enc.mul_(0.3)
    x = rand_x(9, 6)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[0, 3]] = True
    hidden_pre = sae.encode_pre(x)
    sae_out = sae.decode(torch.relu(hidden_pre))
    loss = ghost_grads_loss(x, sae_out, hidden_pre, sae.W_dec, dead)
    assert loss.item() == pytest.approx(ghost_reference(sae, x, dead).item(), rel=1e-9)


def test_ghost_grads_zero_without_dead_latents_or_when_disabled() -> None:
    x = rand_x(5, 6)
    sae = randomise(make_sae(use_ghost_grads=True))
    no_dead = torch.zeros(10, dtype=torch.bool)
    assert sae.training_forward_pass(x, dead_neuron_mask=no_dead).ghost_grad_loss.item() == 0.0
    assert sae.training_forward_pass(x, dead_neuron_mask=None).ghost_grad_loss.item() == 0.0

    disabled = randomise(make_sae(use_ghost_grads=False))
    all_dead = torch.ones(10, dtype=torch.bool)
    out = disabled.training_forward_pass(x, dead_neuron_mask=all_dead)
    assert out.ghost_grad_loss.item() == 0.0
    assert out.loss.item() == pytest.approx((out.mse_loss + out.l1_loss).item(), rel=1e-12)


# -- the fused ReLU step --------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_standard_fused_relu_step_matches_plain_autograd(apply_b_dec_to_input: bool) -> None:
    """The standard step's in-place ReLU + column-sum kernel gives the losses and gradients of the
    textbook formulation, with decoder rows of varied norm so the L1's W_dec gradient matters."""
    sae = randomise(make_sae("standard", apply_b_dec_to_input=apply_b_dec_to_input), dec_scale=True)
    x = rand_x(23, 6)
    assert sae._fused_relu_ok(torch.zeros(2, 10, dtype=F64))
    out = sae.training_forward_pass(x, l1_coefficient=0.7)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = torch.autograd.grad(out.loss, params)

    sae_in = x - sae.b_dec if apply_b_dec_to_input else x
    acts = torch.relu(sae_in @ sae.W_enc + sae.b_enc)
    recon = acts @ sae.W_dec + sae.b_dec
    mse = ((recon - x) ** 2).sum(-1).mean()
    l1 = 0.7 * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    want = torch.autograd.grad(mse + l1, params)
    torch.testing.assert_close(out.feature_acts, acts)
    torch.testing.assert_close(out.mse_loss, mse)
    torch.testing.assert_close(out.l1_loss, l1)
    for name, g, w in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got, want, strict=True):
        torch.testing.assert_close(g, w, msg=f"grad of {name} differs")


def test_standard_step_with_a_latent_hook_keeps_the_pre_activations() -> None:
    """A hook on hook_hidden_pre sees the pre-activations (negative values included): the in-place
    ReLU is skipped when anything is hooked."""
    sae = randomise(make_sae("standard"))
    seen: list[torch.Tensor] = []
    sae.hook_hidden_pre.add_hook(lambda tensor, hook: seen.append(tensor))
    assert not sae._fused_relu_ok(torch.zeros(2, 10, dtype=F64))
    x = rand_x(9, 6)
    sae.training_forward_pass(x)
    assert len(seen) == 1 and bool((seen[0] < 0).any())
    sae.reset_hooks()
    assert sae._fused_relu_ok(torch.zeros(2, 10, dtype=F64))
