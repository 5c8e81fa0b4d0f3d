"""Neuronpedia export: the `batch-N.json` files SAEDashboard's Neuronpedia runner writes, from the
statistics of one pass (`sae_lens.dashboard.collect_feature_statistics`).

The layout and keys follow SAEDashboard 0.8's `NeuronpediaDashboardBatch.to_dict()`:

    batch-N.json = {"model_id", "layer", "sae_set", "sae_id_suffix", "features": [feature, ...]}
    feature = {"feature_index",
               "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
               "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
               "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
               "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
               "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
               "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
               "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
               "activations": [{"bin_min", "bin_max", "bin_contains", "tokens", "values",
                                "qualifying_token_index"}, ...],
               "vector"}

plus `skipped_indexes.json` naming the features not exported. What the values mean, where they
differ from SAEDashboard's:

- `neuron_alignment_*`: the 3 largest entries of the decoder row, and |value| / its L1 norm.
- `correlated_neurons_*` / `correlated_features_*`: the 3 hook dimensions / requested features with
  the largest Pearson correlation over the tokens; `*_l1` holds the cosine similarity, as SAEDashboard
  stores it under that name. SAEDashboard correlates features only within its batch of 128; here
  with every requested feature.
- `pos_*` / `neg_*`: the top and bottom 10 logit effects (`W_U`, or the tied embeddings for an encoder
  model); `logits_hist_*`: a 50-bin histogram of the whole logit-effect vector.
- `freq_hist_*`: the dashboard's histogram of the nonzero activations (bin centres, exact counts).
- `activations`: the top examples (`bin_min` -1, `bin_max` the max activation, `bin_contains` -1),
  then each interval from the highest down, with `bin_contains` the fraction of tokens whose
  activation lies in it (zeros not counted: SAEDashboard's lowest interval counts them). `tokens` is
  the context window around the activating token (`--context-before/--context-after`), not the whole
  row, and `qualifying_token_index` that token's place in it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from sae_lens.atomic_files import atomic_write_text
from sae_lens.dashboard import (
    FeatureStatistics,
    TokenStrings,
    feature_examples,
    unembedding,
)
from sae_lens.models import hook_layer_of
from sae_lens.saes.sae import SparseAutoencoder

FEATURES_PER_BATCH = 128
"""SAEDashboard's Neuronpedia runner default (`n_features_at_a_time`)."""
TABLE_ROWS = 3
"""Rows of the alignment and correlation tables (SAEDashboard's `FeatureTablesConfig(n_rows=3)`)."""
LOGIT_ROWS = 10
LOGIT_HISTOGRAM_BINS = 50


def _round(values: list[float], digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def _top3(matrix: torch.Tensor, k: int = TABLE_ROWS) -> tuple[list[list[int]], list[list[float]]]:
    """Per row, the indices and values of the `k` largest entries."""
    values, indices = matrix.topk(min(k, matrix.shape[1]), dim=1)
    return indices.tolist(), values.tolist()


def _top_correlated(
    cross: torch.Tensor,
    n: int,
    sums: tuple[torch.Tensor, torch.Tensor],
    other_sums: tuple[torch.Tensor, torch.Tensor],
    exclude_diagonal: bool,
    chunk: int = 1024,
) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
    """Per row of `cross` (Σ_t f_i g_j, `[F, G]`), the `TABLE_ROWS` columns with the largest Pearson
    correlation: `(columns, pearson, cosine)`, non-finite entries (a dead feature) dropped.

    `sums` = (Σf, Σf²) `[F]`, `other_sums` = (Σg, Σg²) `[G]`, over `n` tokens.
    """
    f_sum, f_sq = (t.double().cpu() for t in sums)
    g_sum, g_sq = (t.double().cpu() for t in other_sums)
    g_var = n * g_sq - g_sum**2
    columns, pearsons, cosines = [], [], []
    for start in range(0, cross.shape[0], chunk):
        rows = slice(start, start + chunk)
        block = cross[rows].double().cpu()
        pearson = (n * block - torch.outer(f_sum[rows], g_sum)) / torch.outer(
            n * f_sq[rows] - f_sum[rows] ** 2, g_var
        ).sqrt()
        cosine = block / torch.outer(f_sq[rows], g_sq).sqrt()
        if exclude_diagonal:
            local = torch.arange(block.shape[0])
            pearson[local, local + start] = -torch.inf
        pearson = torch.where(pearson.isfinite(), pearson, -torch.inf)
        values, found = pearson.topk(min(TABLE_ROWS, pearson.shape[1]), dim=1)
        for cols, vals, coss in zip(
            found.tolist(), values.tolist(), cosine.gather(1, found).tolist(), strict=True
        ):
            keep = [i for i, v in enumerate(vals) if v != -torch.inf]
            columns.append([cols[i] for i in keep])
            pearsons.append([vals[i] for i in keep])
            cosines.append([coss[i] for i in keep])
    return columns, pearsons, cosines


@torch.no_grad()
def _logit_tables(
    decoder_rows: torch.Tensor, unembed: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, ...]:
    """Per row of `decoder_rows @ unembed`: top and bottom `LOGIT_ROWS` (ids, values), and a
    `LOGIT_HISTOGRAM_BINS`-bin histogram from its min to its max (as `torch.histc` bins it) with that
    min and max: `(top_ids, top_values, bottom_ids, bottom_values, heights, low, high)`."""
    unembed = unembed.float().to(decoder_rows.device)
    parts = []
    for start in range(0, decoder_rows.shape[0], chunk):
        effects = decoder_rows[start : start + chunk].float() @ unembed
        top_values, top_ids = effects.topk(LOGIT_ROWS, dim=1)
        bottom_values, bottom_ids = effects.topk(LOGIT_ROWS, dim=1, largest=False)
        low, high = effects.min(dim=1).values, effects.max(dim=1).values
        scale = LOGIT_HISTOGRAM_BINS / (high - low).clamp_min(1e-12)
        bins = ((effects - low[:, None]) * scale[:, None]).long().clamp_(0, LOGIT_HISTOGRAM_BINS - 1)
        heights = torch.zeros(effects.shape[0], LOGIT_HISTOGRAM_BINS, dtype=torch.long, device=effects.device)
        heights.scatter_add_(1, bins, torch.ones_like(bins))
        parts.append((top_ids, top_values, bottom_ids, bottom_values, heights, low, high))
    return tuple(torch.cat([p[i] for p in parts]).cpu() for i in range(7))


def neuronpedia_features(
    stats: FeatureStatistics,
    sae: SparseAutoencoder,
    model: Any,
    *,
    dataset: str = "",
) -> list[dict[str, Any]]:
    """One Neuronpedia feature dict per collected feature (keys and types of SAEDashboard's)."""
    cfg = stats.config
    strings = TokenStrings(model.tokenizer)
    examples = feature_examples(stats, strings)
    W_dec = sae.W_dec.detach().float()[stats.features.to(sae.W_dec.device)].cpu()
    n_rows = stats.token_rows.shape[0]

    align_idx, align_val = _top3(W_dec)
    l1 = W_dec.abs().sum(1)
    align_l1 = [[abs(v) / float(norm) for v in row] for row, norm in zip(align_val, l1.tolist(), strict=True)]

    n_features = stats.features.numel()
    feature_list = stats.features.tolist()
    empty: list[list[Any]] = [[] for _ in range(n_features)]
    corr_idx, corr_val, corr_cos = empty, empty, empty
    neuron_idx, neuron_val, neuron_cos = empty, empty, empty
    f_sums = (stats.total, stats.square_total)
    if stats.coactivation is not None:
        corr_idx, corr_val, corr_cos = _top_correlated(
            stats.coactivation, stats.n_tokens, f_sums, f_sums, True
        )
        corr_idx = [[feature_list[j] for j in row] for row in corr_idx]
    if stats.neuron_sums is not None:
        x_sums = (stats.neuron_sums["x_sum"], stats.neuron_sums["x_sq_sum"])
        neuron_idx, neuron_val, neuron_cos = _top_correlated(
            stats.neuron_sums["fx"], stats.n_tokens, f_sums, x_sums, False
        )

    unembed, _ = unembedding(model, sae.cfg.output_width)
    logits = _logit_tables(W_dec, unembed) if unembed is not None else None
    if logits is not None:
        strings.prepare(torch.cat([logits[0].flatten(), logits[2].flatten()]).tolist())

    density = stats.density().tolist()
    out = []
    for row, index in enumerate(stats.features.tolist()):
        hist_edges, hist_counts = stats.histogram.display(
            row, float(stats.minimum[row]), float(stats.maximum[row]), cfg.n_histogram_bins
        )
        centres = [(a + b) / 2 for a, b in itertools.pairwise(hist_edges)]
        if logits is not None:
            top_ids, top_values, bottom_ids, bottom_values, heights, logit_min, logit_max = (
                part[row] for part in logits
            )
            width = float(logit_max - logit_min) / LOGIT_HISTOGRAM_BINS
            pos_str, pos_values = strings(top_ids.tolist()), _round(top_values.tolist())
            neg_str, neg_values = strings(bottom_ids.tolist()), _round(bottom_values.tolist())
            logit_heights = heights.tolist()
            logit_centres = [
                round(float(logit_min) + (i + 0.5) * width, 3) for i in range(LOGIT_HISTOGRAM_BINS)
            ]
        else:
            pos_str, pos_values, neg_str, neg_values, logit_heights, logit_centres = [], [], [], [], [], []
        activations = [_activation(e, -1, round(float(stats.maximum[row]), 3), -1) for e in examples[row].top]
        for low, high, group in reversed(examples[row].intervals):
            share = stats.histogram.count_between(row, low, high) / max(stats.n_tokens, 1)
            activations += [_activation(e, low, high, share) for e in group]
        out.append(
            {
                "feature_index": index,
                "neuron_alignment_indices": align_idx[row],
                "neuron_alignment_values": _round(align_val[row]),
                "neuron_alignment_l1": _round(align_l1[row]),
                "correlated_neurons_indices": neuron_idx[row],
                "correlated_neurons_l1": _round(neuron_cos[row]),
                "correlated_neurons_pearson": _round(neuron_val[row]),
                "correlated_features_indices": corr_idx[row],
                "correlated_features_l1": _round(corr_cos[row]),
                "correlated_features_pearson": _round(corr_val[row]),
                "neg_str": neg_str,
                "neg_values": neg_values,
                "pos_str": pos_str,
                "pos_values": pos_values,
                "frac_nonzero": density[row],
                "freq_hist_data_bar_values": _round(centres),
                "freq_hist_data_bar_heights": [int(c) for c in hist_counts],
                "logits_hist_data_bar_heights": logit_heights,
                "logits_hist_data_bar_values": logit_centres,
                "n_prompts_total": n_rows,
                "n_tokens_in_prompt": stats.context_size,
                "dataset": dataset,
                "decoder_weights_dist": [],
                "activations": activations,
                "vector": [],
            }
        )
    return out


def _activation(example: Any, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
    """One entry of a feature's `activations` list."""
    return {
        "bin_min": bin_min if bin_min == -1 else round(float(bin_min), 3),
        "bin_max": round(float(bin_max), 3),
        "bin_contains": bin_contains if bin_contains == -1 else float(bin_contains),
        "tokens": example.tokens,
        "values": _round(example.acts),
        "qualifying_token_index": int(example.at),
    }


def write_neuronpedia_batches(
    stats: FeatureStatistics,
    sae: SparseAutoencoder,
    model: Any,
    out_dir: str | Path,
    *,
    model_id: str | None = None,
    sae_set: str = "",
    sae_id_suffix: str | None = None,
    dataset: str = "",
    hook_name: str | None = None,
    features_per_batch: int = FEATURES_PER_BATCH,
) -> list[Path]:
    """Write `batch-0.json`, `batch-1.json`, ... (`features_per_batch` features each, in index order)
    and `skipped_indexes.json` into `out_dir`; returns the batch files' paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = sae.cfg.metadata
    hook_name = hook_name or meta.get("hook_name", "")
    layer = meta.get("hook_layer") if meta.get("hook_layer") is not None else hook_layer_of(hook_name)
    model_id = model_id or str(meta.get("model_name", "")).rstrip("/").split("/")[-1]
    features = neuronpedia_features(stats, sae, model, dataset=dataset)
    paths = []
    for number, start in enumerate(range(0, len(features), features_per_batch)):
        batch = {
            "model_id": model_id,
            "layer": int(layer or 0),
            "sae_set": sae_set,
            "sae_id_suffix": sae_id_suffix,
            "features": features[start : start + features_per_batch],
        }
        path = out_dir / f"batch-{number}.json"
        atomic_write_text(path, json.dumps(batch))
        paths.append(path)
    requested = set(stats.features.tolist())
    skipped = {
        "model_id": model_id,
        "layer": str(layer or 0),
        "sae_set": sae_set,
        "log_sparsity": 1,
        "skipped_indexes": [i for i in range(sae.cfg.d_sae) if i not in requested],
    }
    atomic_write_text(out_dir / "skipped_indexes.json", json.dumps(skipped))
    return paths


__all__ = ["FEATURES_PER_BATCH", "neuronpedia_features", "write_neuronpedia_batches"]
