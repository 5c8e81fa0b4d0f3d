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

The second half holds the pieces `sae_lens.eval_runner.run_evals` streams with: special-token
masks, hooks that replace only valid positions, SAEBench's per-token explained variance, per-prediction
CE and KL, the scores, and per-latent weight statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sae_lens.models import all_special_ids, is_causal_lm, special_token_ids
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


def splice_hook(
    sae: SparseAutoencoder, scale: float = 1.0, head_index: int | None = None
) -> Callable[..., torch.Tensor]:
    """A forward hook replacing the activation with the SAE's reconstruction.

    `scale` is the training-time input scale when the SAE still works in normalised units. On a
    per-head hook (`attn.hook_z`, `[batch, pos, n_heads, d_head]`) an SAE trained on one head
    (`head_index`, by default the SAE's `metadata["hook_head_index"]`) replaces only that head;
    otherwise it reads and writes all heads concatenated, `[..., n_heads * d_head]`.
    """
    if head_index is None:
        head_index = sae.cfg.metadata.get("hook_head_index")

    def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        sae_in = sae_input_view(activation, head_index)
        flat = sae_in.reshape(-1, sae_in.shape[-1])
        recon = (sae(flat * scale) / scale).reshape(sae_in.shape)
        return write_sae_view(activation, recon, head_index)

    return hook


def sae_input_view(activation: torch.Tensor, head_index: int | None = None) -> torch.Tensor:
    """What an SAE reads from a hook's activation: the activation itself `[batch, pos, d]`, or for a
    per-head hook `[batch, pos, n_heads, d_head]` one head (`head_index`) or all heads concatenated,
    `[batch, pos, n_heads * d_head]` (the layout `ActivationsStore` trains on)."""
    if activation.ndim == 4 and head_index is not None:
        return activation[:, :, head_index]
    if activation.ndim == 4:
        return activation.flatten(-2)
    return activation


def write_sae_view(
    activation: torch.Tensor, values: torch.Tensor, head_index: int | None = None
) -> torch.Tensor:
    """`activation` with its `sae_input_view` replaced by `values` (same shape as the view); a new
    tensor in the activation's dtype. On a per-head hook with `head_index` the other heads are kept."""
    values = values.to(activation.dtype)
    if activation.ndim == 4 and head_index is not None:
        spliced = activation.clone()
        spliced[:, :, head_index] = values
        return spliced
    return values.reshape(activation.shape)


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


# -- building blocks of `sae_lens.eval_runner.run_evals` ----------------------------------------------


def eval_excluded_token_ids(tokenizer: Any, exclude_special_tokens: bool = True) -> torch.Tensor:
    """Token ids whose positions every `run_evals` metric drops, as a sorted LongTensor.

    With `exclude_special_tokens`: every special id of the tokenizer (`all_special_ids`: BOS, EOS,
    CLS, SEP, PAD, UNK, ...) and the framing ids of `special_token_ids`. Without: only a padding id
    that is not also a framing id, since padding never carries meaning (the store drops it the same way).
    """
    framing = special_token_ids(tokenizer)
    if exclude_special_tokens:
        ids = set(all_special_ids(tokenizer)) | {i for i in framing.values() if i is not None}
    else:
        pad = framing["pad"]
        ids = {pad} if pad is not None and pad not in (framing["start"], framing["separator"]) else set()
    return torch.tensor(sorted(ids), dtype=torch.long)


def valid_token_mask(tokens: torch.Tensor, excluded_ids: torch.Tensor) -> torch.Tensor:
    """`[rows, context]` bool: True where the token is not one of `excluded_ids`."""
    return ~torch.isin(tokens, excluded_ids.to(tokens.device))


def prediction_mask(valid: torch.Tensor) -> torch.Tensor:
    """`[rows, context - 1]` bool: the next-token predictions CE and KL count.

    The prediction made at position t counts when token t is valid (its activation is the one the
    splice replaces) and its target, token t + 1, is valid too (no metric scores special tokens).
    """
    return valid[:, :-1] & valid[:, 1:]


def masked_splice_hook(
    replacement: torch.Tensor, mask: torch.Tensor, head_index: int | None = None
) -> Callable[..., torch.Tensor]:
    """A forward hook writing `replacement` `[n_valid, d]` at the positions where `mask`
    `[batch, pos]` is True and keeping the original activation everywhere else.

    The SAE's view of the activation (`sae_input_view`: one head, all heads concatenated, or the
    whole activation) is what is replaced; `replacement` lists the valid positions in row-major order.
    """

    def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        view = sae_input_view(activation, head_index).clone()
        view[mask.to(view.device)] = replacement.to(view.device, view.dtype)
        return write_sae_view(activation, view, head_index)

    return hook


def masked_zero_ablate_hook(mask: torch.Tensor, head_index: int | None = None) -> Callable[..., torch.Tensor]:
    """A forward hook zeroing the SAE's view of the activation at the positions where `mask` is True."""

    def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        view = sae_input_view(activation, head_index).clone()
        view[mask.to(view.device)] = 0
        return write_sae_view(activation, view, head_index)

    return hook


def explained_variance_legacy_per_token(
    x: torch.Tensor, x_hat: torch.Tensor, batch_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """SAEBench's per-token explained variance `[n]` (float64) for tokens `x`, `x_hat` `[n, d]`:
    1 - ‖x_t - x̂_t‖² / ‖x_t - x̄‖², x̄ the mean of the eval batch (`batch_mean` `[d]`, by default
    the mean of the `x` given).

    Averaged over tokens this is `explained_variance_legacy`. A token at the batch mean (zero
    denominator) has no defined value and gives NaN; callers leave such tokens out.
    """
    x = x.double()
    centre = x.mean(dim=0) if batch_mean is None else batch_mean.to(x.device, torch.float64)
    error = (x - x_hat.double()).pow(2).sum(-1)
    spread = (x - centre).pow(2).sum(-1)
    return torch.where(spread > 0, 1 - error / spread.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def next_token_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities `[n_predictions, vocab]` (float32) of the predictions `mask` `[batch, pos - 1]`
    selects from `logits` `[batch, pos, vocab]`."""
    return logits[:, :-1][mask.to(logits.device)].float().log_softmax(-1)


def next_token_nll(log_probs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy `[n_predictions]` of each selected prediction: -log p(token t+1 | ..t).

    `log_probs` from `next_token_log_probs(logits, mask)`, `tokens` `[batch, pos]`.
    """
    targets = tokens[:, 1:][mask].to(log_probs.device)
    return -log_probs.gather(-1, targets[:, None])[:, 0]


def kl_divergence(clean_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) per prediction `[n_predictions]`: Σ_v p_clean (log p_clean - log p_other)."""
    return (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1)


def ce_loss_score(ce_without_sae: float, ce_with_sae: float, ce_with_ablation: float) -> float:
    """(CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 when the SAE costs nothing, 0 when it is as
    bad as zero-ablation; NaN when ablation does not change the loss."""
    gap = ce_with_ablation - ce_without_sae
    return (ce_with_ablation - ce_with_sae) / gap if gap != 0 else float("nan")


def kl_div_score(kl_div_with_sae: float, kl_div_with_ablation: float) -> float:
    """(KL_ablated - KL_sae) / KL_ablated; NaN when ablation does not change the distribution."""
    if kl_div_with_ablation == 0:
        return float("nan")
    return (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation


def embedding_cosine_score(cosine_with_sae: float, cosine_with_ablation: float) -> float:
    """(cos_sae - cos_ablated) / (1 - cos_ablated), the CE score's form for embedding cosines."""
    gap = 1 - cosine_with_ablation
    return (cosine_with_sae - cosine_with_ablation) / gap if gap != 0 else float("nan")


def masked_mean_pool(resid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions `mask` `[batch, pos]` selects of `resid` `[batch, pos, d]`, `[batch, d]`
    (float32); a row with no selected position gives NaN."""
    weights = mask.to(resid.device, torch.float32)[..., None]
    return (resid.float() * weights).sum(1) / weights.sum(1)


@torch.no_grad()
def feature_weight_metrics(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """Per-latent weight statistics `[d_sae]` (float32, CPU): `encoder_norm` ‖W_enc[:, i]‖,
    `decoder_norm` ‖W_dec[i]‖ and, when input and output live in one space (not a transcoder),
    `encoder_decoder_cosine` cos(W_enc[:, i], W_dec[i])."""
    W_enc, W_dec = sae.W_enc.detach().float().cpu(), sae.W_dec.detach().float().cpu()
    metrics = {"encoder_norm": W_enc.norm(dim=0), "decoder_norm": W_dec.norm(dim=1)}
    if W_enc.shape[0] == W_dec.shape[1]:
        metrics["encoder_decoder_cosine"] = F.cosine_similarity(W_enc.T, W_dec, dim=-1)
    return metrics
