"""AuxK (sae_lens/saes/aux_k.py): the loss against a token-by-token reference, where its gradient
goes, and when it is off; through a TopK SAE's training step and as the plain function."""

from __future__ import annotations

import pytest
import torch

from sae_lens.saes import SparseAutoencoder, TrainingBatch
from sae_lens.saes.aux_k import aux_k_loss
from tests.saes.helpers import F64, make_sae, rand_x, randomise


def direct(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`aux_k_loss` called on its own, for the reconstruction `sae(x)` (its settings are the config's)."""
    with torch.no_grad():
        sae_out = sae(x)
    batch = TrainingBatch(x, sae.encode(x), sae_out=sae_out, dead_neuron_mask=dead)
    return aux_k_loss(sae, batch)


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
    # The function itself, on the same residual.
    alone = direct(sae, x, dead)
    assert set(alone) == {"aux_k"}
    assert alone["aux_k"].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("backend", ["csr", "index"])
def test_aux_k_gradient_reaches_only_dead_latents(backend: str) -> None:
    # Positive pre-activations and aux_k >= #dead: every dead latent is used on every token.
    sae = randomise(make_sae("topk", d_in=6, d_sae=12, k=3, aux_k=6, aux_k_coefficient=1.0), b_enc_shift=10.0)
    sae.kernel_backend = backend
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
        assert direct(sae, x, mask) == {}
    # A zero coefficient switches it off too.
    off = randomise(make_sae("topk", d_in=6, d_sae=12, k=3, aux_k_coefficient=0.0))
    assert off.training_forward_pass(x, torch.ones(12, dtype=torch.bool)).ghost_grad_loss.item() == 0.0
    assert direct(off, x, torch.ones(12, dtype=torch.bool)) == {}
