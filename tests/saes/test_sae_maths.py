"""The SAE's maths checked against hand computations and independent references."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.saes import SAEConfig, SparseAutoencoder, StandardSAE, TopKSAE, registered_architectures
from sae_lens.saes.sae import latent_fire_counts

F64 = torch.float64


def make_sae(architecture: str = "standard", d_in: int = 6, d_sae: int = 10, seed: int = 0, **kw: Any):
    """A float64 SAE with random (seeded) unit-norm decoder rows and zero biases."""
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, dtype="float64", **kw)
    return SparseAutoencoder(cfg)


def randomise(sae: SparseAutoencoder, seed: int = 1, b_enc_shift: float = 0.0, dec_scale: bool = False):
    """Give every parameter generic random values (decoder rows of varied norm if `dec_scale`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        sae.b_enc.add_(b_enc_shift)
        if dec_scale:
            sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1, generator=gen, dtype=F64) * 2 + 0.5)
    return sae


def rand_x(n: int, d: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def hand_sae(apply_b_dec_to_input: bool = True, **kw: Any) -> SparseAutoencoder:
    """d_in=2, d_sae=3 with the weights used in the hand computations below."""
    sae = make_sae("standard", d_in=2, d_sae=3, apply_b_dec_to_input=apply_b_dec_to_input, **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        # Row 2 has norm sqrt(2): not unit, so the decoder-norm weighting of L1 matters.
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    return sae


HAND_X = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=F64)


# -- standard SAE encode / decode -------------------------------------------------------------------


def test_standard_encode_decode_by_hand_with_b_dec_subtracted() -> None:
    sae = hand_sae(apply_b_dec_to_input=True)
    # token 0: sae_in = [1, 2] - [.5, -.5] = [.5, 2.5]
    #   pre = [.5, 2.5 - 1, .5 - 2.5 + .5] = [.5, 1.5, -1.5] -> relu [.5, 1.5, 0]
    #   out = .5 * [1, 0] + 1.5 * [0, 1] + b_dec = [.5, 1.5] + [.5, -.5] = [1, 1]
    # token 1: sae_in = [3, 0] - b_dec = [2.5, .5]
    #   pre = [2.5, .5 - 1, 2.5 - .5 + .5] = [2.5, -.5, 2.5] -> relu [2.5, 0, 2.5]
    #   out = [2.5, 0] + 2.5 * [1, 1] + b_dec = [5, 2.5] + [.5, -.5] = [5.5, 2]
    pre = sae.encode_pre(HAND_X)
    torch.testing.assert_close(pre, torch.tensor([[0.5, 1.5, -1.5], [2.5, -0.5, 2.5]], dtype=F64))
    acts = sae.encode(HAND_X)
    torch.testing.assert_close(acts, torch.tensor([[0.5, 1.5, 0.0], [2.5, 0.0, 2.5]], dtype=F64))
    out = sae.decode(acts)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [5.5, 2.0]], dtype=F64))
    torch.testing.assert_close(sae(HAND_X), out)


def test_standard_encode_decode_by_hand_without_b_dec_subtracted() -> None:
    sae = hand_sae(apply_b_dec_to_input=False)
    # token 0: sae_in = [1, 2]; pre = [1, 2 - 1, 1 - 2 + .5] = [1, 1, -.5] -> relu [1, 1, 0]
    #   out = [1, 1] + [.5, -.5] = [1.5, .5]
    # token 1: sae_in = [3, 0]; pre = [3, -1, 3.5] -> relu [3, 0, 3.5]
    #   out = [3, 0] + 3.5 * [1, 1] + [.5, -.5] = [7, 3]
    pre = sae.encode_pre(HAND_X)
    torch.testing.assert_close(pre, torch.tensor([[1.0, 1.0, -0.5], [3.0, -1.0, 3.5]], dtype=F64))
    acts = sae.encode(HAND_X)
    torch.testing.assert_close(acts, torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 3.5]], dtype=F64))
    torch.testing.assert_close(sae(HAND_X), torch.tensor([[1.5, 0.5], [7.0, 3.0]], dtype=F64))


def test_hooks_see_the_intermediate_values() -> None:
    sae = hand_sae()
    _, cache = sae.run_with_cache(HAND_X)
    torch.testing.assert_close(cache["hook_hidden_pre"], sae.encode_pre(HAND_X))
    torch.testing.assert_close(cache["hook_hidden_post"], sae.encode(HAND_X))
    torch.testing.assert_close(cache["hook_sae_out"], sae(HAND_X))


# -- training losses ----------------------------------------------------------------------------------


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


# -- decoder-norm maintenance -------------------------------------------------------------------------


def test_remove_parallel_gradient_by_hand() -> None:
    sae = make_sae(d_in=2, d_sae=1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0]]))
    sae.W_dec.grad = torch.tensor([[1.0, 2.0]], dtype=F64)
    sae.remove_gradient_parallel_to_decoder_directions()
    # unit row u = [.6, .8]; <g, u> = .6 + 1.6 = 2.2; g - 2.2 u = [1 - 1.32, 2 - 1.76]
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[-0.32, 0.24]], dtype=F64))
    assert float(sae.W_dec.grad @ sae.W_dec.detach()[0]) == pytest.approx(0.0, abs=1e-12)


def test_remove_parallel_gradient_keeps_perpendicular_part() -> None:
    sae = randomise(make_sae(), dec_scale=True)
    grad = rand_x(10, 6, seed=5)
    sae.W_dec.grad = grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    W = sae.W_dec.detach()
    new = sae.W_dec.grad
    for i in range(10):
        u = W[i] / W[i].norm()
        assert float(new[i] @ W[i]) == pytest.approx(0.0, abs=1e-10)
        perpendicular = grad[i] - (grad[i] @ u) * u
        torch.testing.assert_close(new[i], perpendicular)
    # No gradient: nothing to do, and no error.
    sae.W_dec.grad = None
    sae.remove_gradient_parallel_to_decoder_directions()
    assert sae.W_dec.grad is None


def test_set_decoder_norm_to_unit_norm() -> None:
    sae = randomise(make_sae(), dec_scale=True)
    directions = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10, dtype=F64))
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10, dtype=F64))
    torch.testing.assert_close(sae.W_dec.detach(), directions)


def test_fresh_sae_has_unit_decoder_rows_and_tied_encoder() -> None:
    sae = make_sae(d_in=5, d_sae=7)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(7, dtype=F64))
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().T)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0


# -- folding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_W_dec_norm_keeps_outputs(apply_b_dec: bool) -> None:
    sae = randomise(make_sae(apply_b_dec_to_input=apply_b_dec), dec_scale=True)
    x = rand_x(11, 6)
    before = sae(x).detach()
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x).detach(), before)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10, dtype=F64))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_activation_norm_scaling_factor(architecture: str, apply_b_dec: bool) -> None:
    kw: dict[str, Any] = {"k": 3} if architecture == "topk" else {}
    sae = make_sae(
        architecture, apply_b_dec_to_input=apply_b_dec, normalize_activations="expected_average_only_in", **kw
    )
    sae = randomise(sae)
    x = rand_x(11, 6)
    s = 3.7
    expected = sae(s * x).detach() / s
    sae.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(sae(x).detach(), expected)
    assert sae.cfg.normalize_activations == "none"


# -- TopK ---------------------------------------------------------------------------------------------


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


def test_topk_training_forward_pass_matches_dense_forward() -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3))
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


def aux_k_reference(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> float:
    """AuxK loss (without coefficient): ‖e - ê‖² / ‖e - ē‖² from the dead latents' top k_aux."""
    with torch.no_grad():
        e = x - sae(x)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        pre_dead = torch.where(dead, pre, -torch.inf)
        n = x.shape[0]
        num = 0.0
        for t in range(n):
            e_hat = torch.zeros(x.shape[1], dtype=F64)
            for i in pre_dead[t].argsort(descending=True)[:k_aux].tolist():
                e_hat += max(float(pre[t, i]), 0.0) * sae.W_dec[i]
            num += float(((e[t] - e_hat) ** 2).sum())
        den = float(((e - e.mean(dim=0)) ** 2).sum())
        return num / den


@pytest.mark.parametrize(
    ("aux_k", "dead_ids"), [(2, [0, 3, 5, 8, 11]), (None, [1, 2, 6, 9, 10]), (8, [4, 7])]
)
def test_aux_k_loss_matches_reference(aux_k: int | None, dead_ids: list[int]) -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3, aux_k=aux_k, aux_k_coefficient=0.5))
    x = rand_x(15, 6)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[dead_ids] = True
    out = sae.training_forward_pass(x, dead_neuron_mask=dead)
    # aux_k unset -> d_in // 2 = 3; never more than the number of dead latents.
    k_aux = min(aux_k if aux_k is not None else 3, len(dead_ids))
    expected = 0.5 * aux_k_reference(sae, x, dead, k_aux)
    assert out.ghost_grad_loss.item() > 0
    assert out.ghost_grad_loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(out.mse_loss.item() + expected, rel=1e-9)


def test_aux_k_gradient_reaches_only_dead_latents() -> None:
    # Positive pre-activations and aux_k >= #dead: every dead latent is used on every token.
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3, aux_k=6, aux_k_coefficient=1.0), b_enc_shift=10.0)
    x = rand_x(15, 6)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[2, 5, 9]] = True
    out = sae.training_forward_pass(x, dead_neuron_mask=dead)
    g_W_enc, g_b_enc, g_W_dec = torch.autograd.grad(out.ghost_grad_loss, [sae.W_enc, sae.b_enc, sae.W_dec])
    live = ~dead
    assert torch.count_nonzero(g_W_enc[:, live]) == 0
    assert torch.count_nonzero(g_b_enc[live]) == 0
    assert torch.count_nonzero(g_W_dec[live]) == 0
    for i in (2, 5, 9):
        assert g_W_enc[:, i].abs().sum() > 0
        assert g_b_enc[i].abs() > 0
        assert g_W_dec[i].abs().sum() > 0


def test_aux_k_zero_without_dead_latents() -> None:
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3))
    x = rand_x(8, 6)
    for mask in (None, torch.zeros(12, dtype=torch.bool)):
        out = sae.training_forward_pass(x, dead_neuron_mask=mask)
        assert out.ghost_grad_loss.item() == 0.0
        assert out.loss.item() == out.mse_loss.item()
    # A zero coefficient switches it off too.
    off = randomise(make_sae("topk", d_in=6, d_sae=12, k=3, aux_k_coefficient=0.0))
    assert off.training_forward_pass(x, torch.ones(12, dtype=torch.bool)).ghost_grad_loss.item() == 0.0


@pytest.mark.parametrize("k", [None, 0, 13])
def test_topk_rejects_bad_k(k: int | None) -> None:
    with pytest.raises(SAELensError, match="k"):
        make_sae("topk", d_in=6, d_sae=12, k=k)


# -- architecture dispatch ----------------------------------------------------------------------------


def test_constructor_dispatches_on_architecture() -> None:
    assert {"standard", "topk"} <= set(registered_architectures())
    standard = SparseAutoencoder(SAEConfig(d_in=4, d_sae=8))
    assert type(standard) is StandardSAE
    topk = SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2))
    assert type(topk) is TopKSAE and topk.k == 2
    assert (
        type(SparseAutoencoder.from_config(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2))) is TopKSAE
    )
    assert type(SparseAutoencoder.from_config(SAEConfig(d_in=4, d_sae=8))) is StandardSAE
    # The subclass can be called directly too.
    assert type(TopKSAE(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2))) is TopKSAE


def test_constructor_accepts_runner_config() -> None:
    cfg = LanguageModelSAERunnerConfig(d_in=4, d_sae=8, k=2, hook_point="blocks.1.hook_resid_post")
    sae = SparseAutoencoder(cfg)
    assert type(sae) is TopKSAE
    assert sae.cfg.d_sae == 8 and sae.cfg.k == 2
    assert sae.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata["hook_layer"] == 1
    # Without d_in there is nothing to build.
    with pytest.raises(SAELensError, match="d_in"):
        SparseAutoencoder(LanguageModelSAERunnerConfig(d_sae=8, k=2))


def test_unknown_architecture_raises() -> None:
    cfg = SAEConfig(d_in=4, d_sae=8, architecture="jumprelu-ish")
    with pytest.raises(SAELensError, match="jumprelu-ish") as info:
        SparseAutoencoder(cfg)
    assert "standard" in str(info.value) and "topk" in str(info.value)
    with pytest.raises(SAELensError):
        SparseAutoencoder.from_config(cfg)


def test_sae_config_validation() -> None:
    with pytest.raises(SAELensError, match="d_sae"):
        SAEConfig(d_in=4, d_sae=0)
    with pytest.raises(SAELensError, match="dtype"):
        SAEConfig(d_in=4, d_sae=8, dtype="int8")


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


def test_latent_fire_counts_dense_in_chunks_and_sparse() -> None:
    """Counts of tokens with a positive activation per latent, for a batch spanning several of the
    dense path's row chunks (2**22 elements each: 2 rows at this width) and for sparse COO input."""
    d_sae = 1 << 21
    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(5, d_sae, generator=gen).clamp_min(0)
    acts[:, :3] = torch.tensor([[1.0, 0.0, 2.0]] * 5)  # latent 0 fires 5 times, latent 1 never
    counts = latent_fire_counts(acts)
    assert counts.dtype == torch.long
    assert counts[:3].tolist() == [5, 0, 5]
    assert torch.equal(counts, (acts > 0).sum(dim=0))
    small = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])
    assert latent_fire_counts(small.to_sparse()).tolist() == [1, 2, 0]
