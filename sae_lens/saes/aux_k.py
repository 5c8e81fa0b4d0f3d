"""AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

Shared by the TopK family as a plain function: using it is no reason to inherit from TopK.
"""

from __future__ import annotations

import torch

from sae_lens.kernels import SparseLatents, sparse_decode
from sae_lens.saes.sae import SparseAutoencoder, TrainingBatch, linear, per_token_squared_error


def aux_k_loss(sae: SparseAutoencoder, batch: TrainingBatch) -> dict[str, torch.Tensor]:
    """`{"aux_k": aux_k_coefficient * AuxK}` for an SAE whose config has `aux_k` and
    `aux_k_coefficient` (the TopK family's), or `{}` when no latent is dead or the coefficient is 0.

    AuxK reconstructs the residual e = target - x̂ (target = x for an SAE) with the top `aux_k`
    dead latents (d_in // 2 when unset) and is normalised by the residual's variance,
    ‖e - ê‖² / ‖e - ē‖², so it is scale-free.
    Only the dead columns of the encoder are multiplied, so the cost grows with the number of dead
    latents rather than with d_sae.
    """
    aux_k, coefficient = getattr(sae.cfg, "aux_k", None), float(getattr(sae.cfg, "aux_k_coefficient", 0.0))
    dead_neuron_mask = batch.dead_neuron_mask
    if dead_neuron_mask is None or coefficient <= 0 or not dead_neuron_mask.any():
        return {}
    dead = dead_neuron_mask.nonzero().squeeze(1)
    k_aux = min(aux_k or sae.cfg.d_in // 2, dead.numel())
    residual = (batch.goal.to(batch.output.dtype) - batch.output).detach()
    sae_in, b_dec_path = sae.encoder_input(batch.x)
    pre_dead = linear(sae_in, sae.W_enc[:, dead], (sae.b_enc - b_dec_path)[dead])
    values, positions = pre_dead.topk(k_aux, dim=-1)
    latents = SparseLatents.from_rows(torch.relu(values), dead[positions], sae.cfg.d_sae)
    residual_hat = sparse_decode(latents, sae.W_dec, None, backend=sae.kernel_backend)
    variance = per_token_squared_error(residual.mean(dim=0, keepdim=True), residual).mean()
    loss = per_token_squared_error(residual_hat, residual).mean() / variance.clamp_min(1e-12)
    return {"aux_k": coefficient * torch.nan_to_num(loss, nan=0.0)}
