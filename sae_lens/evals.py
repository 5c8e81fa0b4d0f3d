"""How good an SAE is: reconstruction metrics on activations, and downstream metrics with the SAE
spliced into the model.

Conventions (see docs/metrics.md):

- L0 = mean over tokens of the number of non-zero latents; L1 = mean over tokens of Σ|f|.
- Explained variance = 1 - Σ‖x - x̂‖² / Σ‖x - x̄‖², x̄ the mean over the evaluated tokens (centred).
- MSE = mean over tokens and dimensions of (x - x̂)².
- CE score = (CE_ablated - CE_sae) / (CE_ablated - CE_clean); KL score = (KL_ablated - KL_sae) /
  KL_ablated, KL taken against the clean next-token distribution; ablation zeroes the hook.
- For encoder models (no next-token head): the cosine similarity of mean-pooled final-layer
  embeddings with the SAE spliced in vs clean, and the same score form against zero-ablation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sae_lens.models import is_causal_lm
from sae_lens.saes.sae import SparseAutoencoder

DENSE_DENSITY = 0.1


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Centred explained variance 1 - Σ‖x - x̂‖² / Σ‖x - x̄‖² over tokens `[n, d]`."""
    x = x.double()
    residual = (x - x_hat.double()).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float(1 - residual / total)


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of `sae` on activations `x` `[n, d_in]` (raw scale).

    Returns l0, l1, mse, explained_variance, cosine_similarity, l2_ratio (E[‖x̂‖/‖x‖]),
    relative_reconstruction_bias (E‖x̂‖² / E[x·x̂]), dead_fraction, dense_fraction and
    `feature_density` `[d_sae]` (fraction of tokens on which each latent is > 0).
    """
    outputs, fired, l0, l1 = [], torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0.0, 0.0
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size].to(sae.device, sae.dtype)
        feature_acts = sae.encode(chunk)
        outputs.append(sae.decode(feature_acts).float().cpu())
        active = feature_acts > 0
        fired += active.sum(dim=0).double().cpu()
        l0 += active.sum().item()
        l1 += feature_acts.abs().sum().item()
    x = x.float().cpu()
    x_hat = torch.cat(outputs)
    n = x.shape[0]
    density = fired / n
    x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
    return {
        "l0": l0 / n,
        "l1": l1 / n,
        "mse": F.mse_loss(x_hat, x).item(),
        "explained_variance": explained_variance(x, x_hat),
        "cosine_similarity": F.cosine_similarity(x_hat, x, dim=-1).mean().item(),
        "l2_ratio": (x_hat_norm / x_norm.clamp_min(1e-12)).mean().item(),
        "relative_reconstruction_bias": (x_hat_norm.pow(2).mean() / (x * x_hat).sum(-1).mean()).item(),
        "dead_fraction": (density == 0).double().mean().item(),
        "dense_fraction": (density > DENSE_DENSITY).double().mean().item(),
        "feature_density": density.float(),
    }


def splice_hook(sae: SparseAutoencoder, scale: float = 1.0) -> Callable[..., torch.Tensor]:
    """A forward hook replacing the activation with the SAE's reconstruction.

    `scale` is the training-time input scale when the SAE still works in normalised units.
    """

    def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        flat = activation.reshape(-1, activation.shape[-1]) if activation.ndim > 2 else activation
        recon = sae(flat * scale) / scale
        return recon.reshape(activation.shape).to(activation.dtype)

    return hook


def zero_ablate_hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
    """A forward hook replacing the activation with zeros."""
    return torch.zeros_like(activation)


@torch.no_grad()
def model_metrics(
    model: Any,
    sae: SparseAutoencoder,
    tokens: torch.Tensor,
    hook_point: str,
    scale: float = 1.0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Downstream metrics with the SAE spliced into `hook_point`, on `tokens` `[n, context]`.

    Causal LMs get ce_loss_clean / ce_loss_with_sae / ce_loss_zero_ablated, ce_score, and
    kl_div_with_sae / kl_div_zero_ablated, kl_score. Encoder models get embedding_cosine_with_sae,
    embedding_cosine_zero_ablated and embedding_cosine_score.
    """
    hooks = {"sae": splice_hook(sae, scale), "ablated": zero_ablate_hook}
    if is_causal_lm(model):
        return _causal_metrics(model, tokens, hook_point, hooks, batch_size)
    return _encoder_metrics(model, tokens, hook_point, hooks, batch_size)


def _causal_metrics(
    model: Any, tokens: torch.Tensor, hook_point: str, hooks: dict[str, Callable], batch_size: int
) -> dict[str, float]:
    ce = {"clean": 0.0, "sae": 0.0, "ablated": 0.0}
    kl = {"sae": 0.0, "ablated": 0.0}
    n_batches = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        n_batches += 1
        clean_logits = model(batch).float()
        clean_logprobs = clean_logits[:, :-1].log_softmax(-1)
        ce["clean"] += _next_token_ce(clean_logprobs, batch)
        for name, hook in hooks.items():
            logits = model.run_with_hooks(batch, fwd_hooks=[(hook_point, hook)]).float()
            logprobs = logits[:, :-1].log_softmax(-1)
            ce[name] += _next_token_ce(logprobs, batch)
            kl[name] += (
                F.kl_div(logprobs, clean_logprobs, log_target=True, reduction="none").sum(-1).mean().item()
            )
    ce = {name: value / n_batches for name, value in ce.items()}
    kl = {name: value / n_batches for name, value in kl.items()}
    ce_gap = ce["ablated"] - ce["clean"]
    return {
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_zero_ablated": ce["ablated"],
        "ce_score": (ce["ablated"] - ce["sae"]) / ce_gap if ce_gap != 0 else float("nan"),
        "kl_div_with_sae": kl["sae"],
        "kl_div_zero_ablated": kl["ablated"],
        "kl_score": (kl["ablated"] - kl["sae"]) / kl["ablated"] if kl["ablated"] != 0 else float("nan"),
    }


def _next_token_ce(logprobs: torch.Tensor, tokens: torch.Tensor) -> float:
    return -logprobs.gather(-1, tokens[:, 1:, None]).mean().item()


def _encoder_metrics(
    model: Any, tokens: torch.Tensor, hook_point: str, hooks: dict[str, Callable], batch_size: int
) -> dict[str, float]:
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    cosine = {"sae": 0.0, "ablated": 0.0}
    n_batches = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        n_batches += 1
        clean = _mean_pooled(model, batch, final, [])
        for name, hook in hooks.items():
            spliced = _mean_pooled(model, batch, final, [(hook_point, hook)])
            cosine[name] += F.cosine_similarity(spliced, clean, dim=-1).mean().item()
    cosine = {name: value / n_batches for name, value in cosine.items()}
    gap = 1 - cosine["ablated"]
    return {
        "embedding_cosine_with_sae": cosine["sae"],
        "embedding_cosine_zero_ablated": cosine["ablated"],
        "embedding_cosine_score": (cosine["sae"] - cosine["ablated"]) / gap if gap != 0 else float("nan"),
    }


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed activation is captured."""


def _mean_pooled(model: Any, tokens: torch.Tensor, final_hook: str, fwd_hooks: list) -> torch.Tensor:
    """Mean over positions of the final block's residual stream, `[batch, d_model]`.

    The pass is cut short at the final block: an encoder's MLM head (a d_model x vocab matmul)
    would otherwise cost more than all the blocks together.
    """
    captured: list[torch.Tensor] = []

    def capture(activation: torch.Tensor, hook: Any = None) -> None:
        captured.append(activation)
        raise _StopForward

    with contextlib.suppress(_StopForward):
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (final_hook, capture)])
    return captured[0].float().mean(dim=1)
