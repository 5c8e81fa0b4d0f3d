"""Feature-dashboard statistics for many features at once, from one pass of the model over a corpus.

Read top to bottom: `collect_feature_statistics` runs the model once over the token rows (up to the
hooked block), encodes every batch with the SAE and folds it into running per-feature statistics
whose size does not grow with the corpus:

- exact counts, sums, maxima and minima of the nonzero activations (density, mean, max);
- the `n_top_examples` largest activations of each feature, kept as (value, token position) in an
  `[n_features, n]` table that is merged batch by batch with `torch.topk`; a running threshold (the
  n-th best so far) drops almost every entry of later batches before any sorting;
- a uniform random sample of `n_samples` nonzero activations per feature: the same merge, keyed by a
  uniform random number per activation (the n largest of i.i.d. uniform keys are a uniform sample
  without replacement). The interval examples are drawn from it;
- a fine histogram of the nonzero activations per feature: 1024 bins over [0, 2^e) whose range
  doubles (merging bins pairwise, which keeps every count exact) whenever a larger activation
  arrives, so no first pass is needed to fix the edges;
- the co-activation sums Σ_t f_ti f_tj of the requested features, accumulated over the active
  (token, feature) entries only, for Pearson correlations.

Every kept activation carries the activations of its context window, and the token rows are kept
(4 bytes a token), so the windows' tokens are read at the end. `dashboard_data` then adds what needs
no corpus (nearest features by decoder cosine over the whole dictionary, logit effects) and returns
the dict that `sae_lens.html.write_dashboard_html` renders.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from sae_lens.activations_store import ActivationsStore, DatasetExhausted
from sae_lens.config_fields import non_negative_int, one_of, option, positive_int, validate_fields
from sae_lens.errors import SAELensError
from sae_lens.models import hook_layer_of, is_causal_lm
from sae_lens.saes.sae import SparseAutoencoder

INTERVAL_KINDS = ("quantile", "equal_width")
FINE_BINS = 1024
"""Bins of the running per-feature histogram (a power of two, so bins merge pairwise)."""


@dataclass
class DashboardConfig:
    """What a dashboard collects per feature, and how much of it it keeps."""

    n_top_examples: int = option(20, positive_int)
    """Top-activating contexts kept per feature."""
    n_intervals: int = option(10, positive_int)
    """Activation intervals the interval examples are drawn from."""
    n_examples_per_interval: int = option(5, non_negative_int)
    """Examples drawn from each interval."""
    interval_kind: str = option("quantile", one_of(*INTERVAL_KINDS))
    """`quantile`: each interval holds an equal share of the nonzero activations; `equal_width`: the
    range [min, max] of the nonzero activations cut into equal parts."""
    n_samples: int = option(200, positive_int)
    """Uniform random sample of nonzero activations kept per feature (the interval examples come from
    it). A feature that fires at most this often keeps all of its activations, and its quantiles are
    exact."""
    context_before: int = option(8, non_negative_int)
    """Tokens shown before the activating token."""
    context_after: int = option(3, non_negative_int)
    """Tokens shown after the activating token."""
    n_histogram_bins: int = option(40, positive_int)
    """Most bins of the activation histogram shown."""
    n_logits: int = option(10, non_negative_int)
    """Top and bottom tokens of the logit effects."""
    n_nearest: int = option(10, non_negative_int)
    """Nearest features by decoder cosine (over the whole dictionary)."""
    n_correlated: int = option(10, non_negative_int)
    """Most correlated features by co-activation (over the requested features); 0 skips the
    `[n_features, n_features]` co-activation sums."""
    exclude_special_tokens: bool = True
    """Leave the tokenizer's special tokens ([CLS], [SEP], BOS/EOS, padding, ...) out of every statistic."""
    neuron_correlations: bool = False
    """Also accumulate the correlations of each feature with the hook's dimensions (the Neuronpedia
    export's `correlated_neurons_*`)."""
    batch_rows: int = option(16, positive_int)
    """Token rows per model forward pass."""
    seed: int = 0
    """Seed of the random sample and of the interval draws."""
    max_correlation_features: int = option(16384, positive_int)
    """Refuse co-activation sums beyond this many features (they take 4·n² bytes)."""

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def window(self) -> int:
        """Tokens in a context window."""
        return self.context_before + 1 + self.context_after


# -- running state ----------------------------------------------------------------------------------


EMPTY_KEY = torch.finfo(torch.float32).min
"""Key of an empty slot: below every real key, above the -inf that pads candidate tables."""


class _KeptActivations:
    """Per feature, the `size` entries with the largest keys seen so far, with their context windows.

    `keys`, `values`, `positions` (global token index: row * context + position) are `[n_features,
    size]`, `windows` `[n_features, size, window]`. Slots are unordered: a better entry overwrites the
    worst one in place, so the windows never move. Empty slots have key `EMPTY_KEY`, position -1.
    """

    def __init__(self, n_features: int, size: int, window: int, device: torch.device) -> None:
        self.size = size
        self.keys = torch.full((n_features, size), EMPTY_KEY, device=device)
        self.values = torch.zeros(n_features, size, device=device)
        self.positions = torch.full((n_features, size), -1, dtype=torch.long, device=device)
        self.windows = torch.zeros(n_features, size, window, device=device)

    def offer(
        self,
        feature: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        windows_of: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Merge candidate entries `[n]` (feature column, key, value, position) into the table.

        `windows_of(entries)` returns the context windows `[len(entries), window]` of the given
        candidate entries; it is called only for those that get in.
        """
        # The running threshold: an entry at or below its feature's worst kept key cannot get in.
        threshold = self.keys.min(dim=1).values
        candidate = (keys > threshold[feature]).nonzero().squeeze(1)
        if candidate.numel() == 0:
            return
        cand_feature = feature[candidate]
        # Sort by key (descending), then stably by feature: each feature's candidates are contiguous
        # and best first, so an entry's rank within its feature is its offset in the run.
        order = torch.argsort(keys[candidate], descending=True, stable=True)
        order = order[torch.argsort(cand_feature[order], stable=True)]
        touched, slot, run_length = torch.unique_consecutive(
            cand_feature[order], return_inverse=True, return_counts=True
        )
        rank = torch.arange(order.numel(), device=order.device) - (run_length.cumsum(0) - run_length)[slot]
        best = rank < self.size
        chosen, slot, rank = candidate[order[best]], slot[best], rank[best]
        new_keys = torch.full((touched.numel(), self.size), -math.inf, device=keys.device)
        new_keys[slot, rank] = keys[chosen]
        new_entry = torch.full((touched.numel(), self.size), -1, dtype=torch.long, device=keys.device)
        new_entry[slot, rank] = chosen
        # The best `size` of old and new; every new entry that makes it takes the place of an old one
        # that does not. Per row both counts are equal, and nonzero() lists both row by row, so the
        # k-th incoming entry overall lands in the k-th freed slot overall.
        _, pick = torch.cat([self.keys[touched], new_keys], dim=1).topk(self.size, dim=1)
        selected = torch.zeros(touched.numel(), 2 * self.size, dtype=torch.bool, device=keys.device)
        selected.scatter_(1, pick, True)
        freed_row, freed_slot = (~selected[:, : self.size]).nonzero(as_tuple=True)
        in_row, in_slot = selected[:, self.size :].nonzero(as_tuple=True)
        entries = new_entry[in_row, in_slot]
        rows = touched[freed_row]
        self.keys[rows, freed_slot] = keys[entries]
        self.values[rows, freed_slot] = values[entries]
        self.positions[rows, freed_slot] = positions[entries]
        self.windows[rows, freed_slot] = windows_of(entries)

    def sorted_slots(self) -> torch.Tensor:
        """Each row's slots by key, descending `[n_features, size]` (empty slots last)."""
        return self.keys.argsort(dim=1, descending=True)


class _DoublingHistogram:
    """Exact per-feature histograms of nonzero activations without knowing their range in advance.

    Feature i's `FINE_BINS` bins cover [0, top_i) with top_i a power of two above its largest
    activation so far. When an activation reaches top_i, the range doubles (as often as needed) and
    neighbouring bins merge pairwise; bin widths are powers of two, so `v * FINE_BINS / top` is exact
    and no count ever moves to the wrong bin.
    """

    def __init__(self, n_features: int, device: torch.device) -> None:
        self.counts = torch.zeros(n_features, FINE_BINS, dtype=torch.int32, device=device)
        self.top = torch.zeros(n_features, device=device)

    def add(self, feature: torch.Tensor, values: torch.Tensor, batch_max: torch.Tensor) -> None:
        """Count `values` `[n]` (> 0) of features `feature` `[n]`; `batch_max` `[n_features]` is each
        feature's largest value among them (0 if none)."""
        grow = (batch_max >= self.top).nonzero().squeeze(1)
        grow = grow[batch_max[grow] > 0]
        if grow.numel():
            _, exponent = torch.frexp(batch_max[grow])  # max = m * 2^e with m in [0.5, 1): 2^e > max
            new_top = torch.ldexp(torch.ones_like(batch_max[grow]), exponent)
            old_top = self.top[grow]
            doublings = torch.where(
                old_top > 0, torch.log2(new_top / old_top).round(), torch.zeros_like(old_top)
            )
            for shift in doublings.unique().tolist():
                rows = grow[doublings == shift]
                group = min(1 << int(shift), FINE_BINS)
                merged = (
                    self.counts[rows].view(rows.numel(), FINE_BINS // group, group).sum(-1, dtype=torch.int32)
                )
                self.counts[rows] = 0
                self.counts[rows, : FINE_BINS // group] = merged
            self.top[grow] = new_top
        bins = (values * (FINE_BINS / self.top[feature])).long().clamp_(max=FINE_BINS - 1)
        flat = self.counts.view(-1)
        flat.index_add_(0, feature * FINE_BINS + bins, torch.ones_like(bins, dtype=torch.int32))

    def bin_width(self, row: int) -> float:
        """Width of feature row `row`'s fine bins."""
        return float(self.top[row]) / FINE_BINS

    def display(self, row: int, low: float, high: float, max_bins: int) -> tuple[list[float], list[int]]:
        """`(edges, counts)` over [low, high]: the fine bins merged in aligned groups of 2^g, with the
        smallest g that gives at most `max_bins` bins; counts are exact."""
        width = self.bin_width(row)
        if width <= 0:
            return [], []
        first, last = int(low / width), min(int(high / width), FINE_BINS - 1)
        group = 1
        while last // group - first // group + 1 > max_bins:
            group *= 2
        start, end = (first // group) * group, (last // group + 1) * group
        counts = self.counts[row, start:end].view(-1, group).sum(-1).tolist()
        edges = [(start + j * group) * width for j in range(len(counts) + 1)]
        return edges, counts

    def quantiles(self, levels: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Quantiles `[F, q]` at `levels` `[q]` of every feature, as `torch.quantile` defines them (linear
        between the order statistics at rank q·(n-1)), each order statistic placed inside the fine bin
        that holds it: less than one bin width from the exact quantile. Level 0 gives `low`, level 1
        `high` `[F]` (the exact smallest and largest activations)."""
        counts = self.counts.double().cpu()
        cumulative = counts.cumsum(1)
        n = cumulative[:, -1:]
        width = self.top.double().cpu()[:, None] / FINE_BINS

        def order_statistic(rank: torch.Tensor) -> torch.Tensor:
            # The rank-th smallest value (0-based) lies in the first bin whose cumulative count
            # exceeds rank; spread a bin's values evenly over it.
            bins = torch.searchsorted(cumulative, rank + 1).clamp_(max=FINE_BINS - 1)
            in_bin = counts.gather(1, bins).clamp_min(1)
            within = (rank - (cumulative.gather(1, bins) - in_bin) + 0.5) / in_bin
            value = (bins + within.clamp_(0, 1)) * width
            return torch.minimum(torch.maximum(value, low[:, None]), high[:, None])

        rank = levels.double()[None, :] * (n - 1).clamp_min(0)
        below = rank.floor()
        above = torch.minimum(below + 1, (n - 1).clamp_min(0))
        values = torch.lerp(order_statistic(below), order_statistic(above), rank - below)
        values[:, levels <= 0] = low[:, None]
        values[:, levels >= 1] = high[:, None]
        return values

    def count_between(self, row: int, low: float, high: float) -> float:
        """Estimated number of activations in [low, high] (exact at fine-bin edges)."""
        counts = self.counts[row].double().cpu()
        width = self.bin_width(row)
        if width <= 0:
            return 0.0

        def below(value: float) -> float:
            position = min(max(value / width, 0.0), float(FINE_BINS))
            whole = int(position)
            part = float(counts[whole]) * (position - whole) if whole < FINE_BINS else 0.0
            return float(counts[:whole].sum()) + part

        return below(high) - below(low)


@dataclass
class FeatureStatistics:
    """What one pass collected for the requested features (all tensors indexed by position in
    `features`, not by feature index)."""

    features: torch.Tensor
    """The requested feature indices `[F]`, sorted."""
    n_tokens: int
    """Tokens the statistics cover (special tokens excluded when configured)."""
    context_size: int
    """Tokens per row."""
    count: torch.Tensor
    """Nonzero activations per feature `[F]`."""
    total: torch.Tensor
    """Sum of the activations per feature `[F]` (float64)."""
    square_total: torch.Tensor
    """Sum of the squared activations per feature `[F]` (float64)."""
    maximum: torch.Tensor
    """Largest activation per feature `[F]` (0 when it never fired)."""
    minimum: torch.Tensor
    """Smallest nonzero activation per feature `[F]` (0 when it never fired)."""
    top: _KeptActivations
    """The largest activations and their windows."""
    samples: _KeptActivations
    """A uniform sample of the nonzero activations and their windows."""
    histogram: _DoublingHistogram
    """Fine histograms of the nonzero activations."""
    coactivation: torch.Tensor | None
    """Σ_t f_ti f_tj `[F, F]` (its diagonal is Σ_t f_ti²), or None when not collected."""
    neuron_sums: dict[str, torch.Tensor] | None
    """`x_sum [d_in]`, `x_sq_sum [d_in]`, `fx [F, d_in]` for the feature-neuron correlations, or None."""
    token_rows: torch.Tensor
    """Every token row read, `[n_rows, context]` (int32)."""
    config: DashboardConfig
    seconds: float = 0.0
    """Wall time of the pass."""

    def density(self) -> torch.Tensor:
        """Fraction of the tokens on which each feature fires `[F]`."""
        return self.count.double() / max(self.n_tokens, 1)

    def mean(self) -> torch.Tensor:
        """Mean activation over the tokens where each feature fires `[F]` (0 if it never does)."""
        return self.total / self.count.clamp_min(1).double()

    def correlations(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pearson correlations of the activations over the tokens, `[len(rows), F]` (NaN where a
        feature never fired), from the co-activation sums."""
        if self.coactivation is None:
            raise SAELensError("co-activation sums were not collected (n_correlated=0)")
        n = float(max(self.n_tokens, 1))
        rows = torch.arange(self.features.numel()) if rows is None else rows
        # The per-feature terms in float64, the [rows, F] ones in float32 (what the sums are kept in).
        sums = self.total.to(self.coactivation.device)
        scale = (sums / n).float()
        deviation = (self.square_total.to(sums.device) - sums * sums / n).clamp_min(0).sqrt().float()
        centred = self.coactivation[rows] - sums[rows].float()[:, None] * scale[None, :]
        return centred / (deviation[rows, None] * deviation[None, :])


# -- the pass ---------------------------------------------------------------------------------------


def make_store(
    model: Any,
    sae: SparseAutoencoder,
    dataset: Iterable[dict[str, Any]] | None = None,
    *,
    hook_name: str | None = None,
    context_size: int | None = None,
    prepend_bos: bool | None = None,
    exclude_special_tokens: bool = True,
    batch_rows: int = 16,
    column: str = "text",
    is_tokenized: bool = False,
) -> ActivationsStore:
    """The `ActivationsStore` that packs `dataset` into rows and reads the SAE's hook.

    Hook, context size and BOS handling come from the SAE's metadata unless given. Raises a
    `SAELensError` when the model has no such hook.
    """
    meta = sae.cfg.metadata
    hook_name = hook_name or meta.get("hook_name")
    if not hook_name:
        raise SAELensError("the SAE's metadata names no hook_name; pass the hook (--hook)")
    layer = meta.get("hook_layer") if hook_name == meta.get("hook_name") else None
    if layer is None:
        layer = hook_layer_of(hook_name)
    return ActivationsStore(
        model,
        dataset if dataset is not None else [],
        hook_point=hook_name,
        hook_layer=layer if layer is not None else 0,
        hook_head_index=meta.get("hook_head_index") if hook_name == meta.get("hook_name") else None,
        context_size=context_size or int(meta.get("context_size") or 128),
        train_batch_size=1,
        store_batch_size=batch_rows,
        column=column,
        is_tokenized=is_tokenized,
        prepend_bos=bool(meta.get("prepend_bos", True)) if prepend_bos is None else prepend_bos,
        exclude_special_tokens=exclude_special_tokens,
        device=sae.device,
    )


def check_model_matches(sae: SparseAutoencoder, store: ActivationsStore) -> None:
    """Raise a `SAELensError` if the hook's activations are not `d_in` wide (one 2-token forward)."""
    probe = torch.full((1, 2), store.start_token_id, dtype=torch.long)
    width = store.get_activations(probe).shape[-1]
    if width != sae.cfg.d_in:
        model_name = sae.cfg.metadata.get("model_name", "its model")
        raise SAELensError(
            f"the model does not match the SAE: {store.hook_point} has width {width}, the SAE reads "
            f"d_in={sae.cfg.d_in} (it was trained on {model_name}); pass the right --model or --hook"
        )


def iter_token_batches(
    store: ActivationsStore, n_tokens: int, skip_tokens: int = 0
) -> Iterator[torch.Tensor]:
    """The store's packed rows `[rows, context]`, `store_batch_size` at a time, until `n_tokens`
    tokens (rounded up to whole rows), after skipping the first `skip_tokens`.

    Raises a `SAELensError` when the dataset yields no row at all.
    """
    context = store.context_size
    skip_rows, n_rows = -(-skip_tokens // context), -(-n_tokens // context)
    try:
        while skip_rows > 0:
            skip_rows -= store.get_batch_tokens(min(skip_rows, 256)).shape[0]
        first = store.get_batch_tokens(min(store.store_batch_size, n_rows))
    except DatasetExhausted:
        raise SAELensError(
            f"the dataset yields no row of context_size={context} tokens"
            + (f" after skipping {skip_tokens:,} tokens" if skip_tokens else "")
            + "; use a longer dataset or a smaller --context-size"
        ) from None
    yield first
    served = first.shape[0]
    while served < n_rows:
        try:
            batch = store.get_batch_tokens(min(store.store_batch_size, n_rows - served))
        except DatasetExhausted:
            return
        served += batch.shape[0]
        yield batch


@torch.no_grad()
def collect_feature_statistics(
    sae: SparseAutoencoder,
    store: ActivationsStore,
    token_batches: Iterable[torch.Tensor],
    features: Sequence[int] | None = None,
    config: DashboardConfig | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> FeatureStatistics:
    """One pass of the model over `token_batches` (each `[rows, context]`), statistics for all of
    `features` (default: the whole dictionary) at once.

    `store` reads the hook's activations and knows which token ids to exclude (see `make_store`).
    `progress(n)` is called with the number of tokens of each batch done.
    """
    config = config or DashboardConfig()
    started = time.perf_counter()
    d_sae = sae.cfg.d_sae
    feature_index = validate_features(features, d_sae)
    subset = None if feature_index.numel() == d_sae else feature_index.to(sae.device)
    n_features = feature_index.numel()
    device = sae.device
    window = config.window
    offsets = torch.arange(-config.context_before, config.context_after + 1, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    collect_pairs = config.n_correlated > 0
    if collect_pairs and n_features > config.max_correlation_features:
        raise SAELensError(
            f"co-activation sums for {n_features:,} features would take "
            f"{4 * n_features**2 / 2**30:.1f} GiB; request at most {config.max_correlation_features:,} "
            "features or set n_correlated=0 (--n-correlated 0)"
        )
    # One extra row and column absorb the padding of the pair lists (feature id n_features).
    pairs = torch.zeros((n_features + 1) ** 2, device=device) if collect_pairs else None
    count = torch.zeros(n_features, dtype=torch.long, device=device)
    total = torch.zeros(n_features, dtype=torch.float64, device=device)
    square_total = torch.zeros(n_features, dtype=torch.float64, device=device)
    maximum = torch.zeros(n_features, device=device)
    minimum = torch.full((n_features,), math.inf, device=device)
    top = _KeptActivations(n_features, config.n_top_examples, window, device)
    samples = _KeptActivations(n_features, config.n_samples, window, device)
    histogram = _DoublingHistogram(n_features, device)
    neuron_sums: dict[str, torch.Tensor] | None = None
    excluded = store.excluded_token_ids.to(device)
    rows_seen: list[torch.Tensor] = []
    n_rows = n_kept = 0
    context = None

    for tokens in token_batches:
        tokens = tokens.to(device)
        batch, context = tokens.shape
        acts = store.get_activations(tokens)
        feature_acts = sae.encode(acts)
        if subset is not None:
            feature_acts = feature_acts.index_select(-1, subset)
        flat = feature_acts.reshape(batch * context, n_features)
        keep = ~torch.isin(tokens.reshape(-1), excluded)
        flat[~keep] = 0  # excluded tokens count nowhere, and show 0 in other tokens' windows
        n_kept += int(keep.sum())
        token, feature = (flat > 0).nonzero(as_tuple=True)
        values = flat[token, feature]

        count += torch.bincount(feature, minlength=n_features)
        total += torch.bincount(feature, weights=values.double(), minlength=n_features)
        square_total += torch.bincount(feature, weights=values.double().square(), minlength=n_features)
        batch_max = torch.zeros(n_features, device=device).scatter_reduce_(0, feature, values, "amax")
        maximum = torch.maximum(maximum, batch_max)
        minimum.scatter_reduce_(0, feature, values, "amin")
        histogram.add(feature, values, batch_max)

        positions = n_rows * context + token

        def windows_of(entries: torch.Tensor, token: torch.Tensor = token, feature: torch.Tensor = feature,
                       flat: torch.Tensor = flat, context: int = context) -> torch.Tensor:  # fmt: skip
            # The activations of the entry's feature at the tokens around it, within its own row.
            at = token[entries]
            spots = at[:, None] + offsets[None, :]
            inside = (spots % context - at[:, None] % context == offsets[None, :]) & (spots >= 0)
            spots = spots.clamp(0, flat.shape[0] - 1)
            return flat[spots, feature[entries][:, None]] * inside

        top.offer(feature, values, values, positions, windows_of)
        sample_keys = torch.rand(values.shape, generator=generator, device=device)
        samples.offer(feature, sample_keys, values, positions, windows_of)
        if pairs is not None:
            _add_coactivations(pairs, n_features, flat, token, feature, values)
        if config.neuron_correlations:
            neuron_sums = _add_neuron_sums(neuron_sums, acts.reshape(batch * context, -1), keep, token, feature,
                                           values, n_features)  # fmt: skip

        rows_seen.append(tokens.to("cpu", torch.int32))
        n_rows += batch
        if progress is not None:
            progress(batch * context)

    if context is None:
        raise SAELensError("no token rows to collect statistics from: the dataset is empty")
    minimum = torch.where(count > 0, minimum, torch.zeros_like(minimum))
    coactivation = None
    if pairs is not None:
        side = n_features + 1
        coactivation = pairs.view(side, side)[:n_features, :n_features]
        # Only pairs (i <= j) were accumulated: mirror the upper triangle.
        coactivation = coactivation + coactivation.T - torch.diag(coactivation.diagonal())
    return FeatureStatistics(
        features=feature_index,
        n_tokens=n_kept,
        context_size=context,
        count=count.cpu(),
        total=total.cpu(),
        square_total=square_total.cpu(),
        maximum=maximum.cpu(),
        minimum=minimum.cpu(),
        top=top,
        samples=samples,
        histogram=histogram,
        coactivation=coactivation,
        neuron_sums=neuron_sums,
        token_rows=torch.cat(rows_seen),
        config=config,
        seconds=time.perf_counter() - started,
    )


def _add_coactivations(
    pairs: torch.Tensor,
    n_features: int,
    flat: torch.Tensor,
    token: torch.Tensor,
    feature: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Add Σ_t f_ti f_tj (i <= j) of one batch into `pairs` (flat `[(F+1)²]`), from the active entries.

    Each token's active features are laid out in one padded row ([tokens, m], padding = feature F
    with value 0); the products of every pair (a <= b) of slots of a row are scattered into the
    matrix. That is Σ_t n_t² / 2 updates for n_t active features on token t, instead of the
    F² × tokens of a dense product. When so many features are active that pairs would be the slower
    way (dense SAEs), it falls back to one dense matmul.
    """
    side = n_features + 1
    per_token = torch.bincount(token, minlength=flat.shape[0])
    n_pairs = int((per_token * (per_token + 1) // 2).sum())
    if n_pairs == 0:
        return
    if n_pairs * 64 > flat.shape[0] * n_features * n_features:
        dense = flat.T @ flat
        pairs.view(side, side)[:n_features, :n_features] += torch.triu(dense)
        return
    active_tokens = per_token.nonzero().squeeze(1)
    widest = int(per_token.max())
    row_of = torch.full((flat.shape[0],), -1, dtype=torch.long, device=flat.device)
    row_of[active_tokens] = torch.arange(active_tokens.numel(), device=flat.device)
    # nonzero() lists entries token by token, so an entry's slot is its offset within its token.
    slot = torch.arange(token.numel(), device=flat.device) - (per_token.cumsum(0) - per_token)[token]
    ids = torch.full((active_tokens.numel(), widest), n_features, dtype=torch.long, device=flat.device)
    acts = torch.zeros(active_tokens.numel(), widest, device=flat.device)
    ids[row_of[token], slot] = feature
    acts[row_of[token], slot] = values
    left, right = torch.triu_indices(widest, widest, device=flat.device)
    # Bound the [rows, m(m+1)/2] temporaries to ~4M entries.
    step = max(1, (1 << 22) // left.numel())
    for start in range(0, ids.shape[0], step):
        chunk_ids, chunk_acts = ids[start : start + step], acts[start : start + step]
        keys = chunk_ids[:, left] * side + chunk_ids[:, right]
        pairs.index_add_(0, keys.reshape(-1), (chunk_acts[:, left] * chunk_acts[:, right]).reshape(-1))


def _add_neuron_sums(
    sums: dict[str, torch.Tensor] | None,
    acts: torch.Tensor,
    keep: torch.Tensor,
    token: torch.Tensor,
    feature: torch.Tensor,
    values: torch.Tensor,
    n_features: int,
) -> dict[str, torch.Tensor]:
    """Accumulate Σx, Σx² over kept tokens and Σ f_i x (a sparse `[F, tokens] @ [tokens, d_in]`)."""
    acts = acts.float()
    kept = acts[keep]
    if sums is None:
        d_in = acts.shape[-1]
        sums = {
            "x_sum": torch.zeros(d_in, dtype=torch.float64, device=acts.device),
            "x_sq_sum": torch.zeros(d_in, dtype=torch.float64, device=acts.device),
            "fx": torch.zeros(n_features, d_in, device=acts.device),
        }
    sums["x_sum"] += kept.sum(0, dtype=torch.float64)
    sums["x_sq_sum"] += kept.double().pow(2).sum(0)
    sparse = torch.sparse_coo_tensor(
        torch.stack([feature, token]), values, (n_features, acts.shape[0]), check_invariants=False
    )
    sums["fx"] += torch.sparse.mm(sparse, acts)
    return sums


def validate_features(features: Sequence[int] | torch.Tensor | None, d_sae: int) -> torch.Tensor:
    """The requested feature indices as a sorted, de-duplicated `[F]` long tensor; a `SAELensError`
    names any index outside 0..d_sae-1."""
    if features is None:
        return torch.arange(d_sae)
    index = torch.as_tensor(
        list(features) if not isinstance(features, torch.Tensor) else features, dtype=torch.long
    )
    if index.numel() == 0:
        raise SAELensError("no features requested")
    bad = index[(index < 0) | (index >= d_sae)]
    if bad.numel():
        raise SAELensError(
            f"feature {int(bad[0])} is out of range: the SAE has {d_sae} features (0..{d_sae - 1})"
        )
    return index.unique()


def parse_features(spec: str, d_sae: int) -> list[int]:
    """`all`, a range `START:STOP` (Python slice rules, STOP excluded, either side optional) or a list
    `3,17,42` (ranges allowed inside: `0:10,42`) -> sorted feature indices, checked against d_sae."""
    spec = spec.strip()
    if spec == "all":
        return list(range(d_sae))

    def number(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise SAELensError(
                f"cannot read --features {spec!r}: use all, START:STOP (e.g. 0:200) or a list such as 3,17,42"
            ) from None

    chosen: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if ":" not in part:
            chosen.append(number(part))
            continue
        start_text, stop_text = (t.strip() for t in part.split(":", 1))
        start = number(start_text) if start_text else 0
        stop = number(stop_text) if stop_text else d_sae
        if not 0 <= start < stop <= d_sae:
            raise SAELensError(
                f"feature range {part!r} is out of bounds: the SAE has {d_sae} features (valid ranges lie within 0:{d_sae})"
            )
        chosen.extend(range(start, stop))
    return validate_features(chosen, d_sae).tolist()


# -- what needs no corpus -------------------------------------------------------------------------


def unembedding(model: Any, d_in: int) -> tuple[torch.Tensor | None, str | None]:
    """`(U [d_in, d_vocab], source)` for logit effects `W_dec[i] @ U`.

    A causal LM's unembedding `W_U` (source "W_U"); for an encoder model (MiniLM) the transposed token
    embeddings `W_E.T` ("tied_embeddings"): a BERT-style MLM head is tied to them, but it also has a
    dense + LayerNorm transform this skips, and a middle layer is not where the head reads. `(None,
    None)` when the SAE's width is not the model's d_model (the decoder does not write the residual
    stream) or the model has neither.
    """
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    if d_model != d_in:
        return None, None
    if is_causal_lm(model) and getattr(model, "W_U", None) is not None:
        return model.W_U.detach(), "W_U"
    embed = getattr(model, "W_E", None)
    if embed is not None:
        return embed.detach().T, "tied_embeddings"
    return None, None


@torch.no_grad()
def logit_effects(
    decoder_rows: torch.Tensor, unembed: torch.Tensor, k: int, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top and bottom `k` entries of `decoder_rows @ unembed` per row: `(top_ids, top_values,
    bottom_ids, bottom_values)`, each `[F, k]`, for `decoder_rows` `[F, d_in]`, `unembed` `[d_in, V]`."""
    parts: list[tuple[torch.Tensor, ...]] = []
    unembed = unembed.to(decoder_rows.device, torch.float32)
    for start in range(0, decoder_rows.shape[0], chunk):
        effects = decoder_rows[start : start + chunk].float() @ unembed
        top_values, top_ids = effects.topk(k, dim=1)
        bottom_values, bottom_ids = effects.topk(k, dim=1, largest=False)
        parts.append((top_ids, top_values, bottom_ids, bottom_values))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


@torch.no_grad()
def nearest_by_decoder(
    W_dec: torch.Tensor, features: torch.Tensor, k: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` features whose decoder rows have the largest cosine with each of `features` `[F]`,
    over the whole dictionary `W_dec` `[d_sae, d_in]`, the feature itself excluded: `(indices,
    cosines)`, each `[F, k]`."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, W_dec.shape[0] - 1)
    features = features.to(W_dec.device)
    indices, cosines = [], []
    for start in range(0, features.numel(), chunk):
        rows = features[start : start + chunk]
        similarity = unit[rows] @ unit.T
        similarity[torch.arange(rows.numel()), rows] = -math.inf
        values, found = similarity.topk(k, dim=1)
        indices.append(found)
        cosines.append(values)
    return torch.cat(indices).cpu(), torch.cat(cosines).cpu()


# -- assembling the dashboard -----------------------------------------------------------------------


class TokenStrings:
    """Token id -> display string (" the", "##ing", "[CLS]"), decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def prepare(self, ids: Iterable[int]) -> None:
        """Decode every id of `ids` not decoded yet, in one batch."""
        new = sorted(set(ids) - self.cache.keys())
        if new:
            texts = self.tokenizer.batch_decode([[i] for i in new], clean_up_tokenization_spaces=False)
            self.cache.update(zip(new, texts, strict=True))

    def __call__(self, ids: Iterable[int]) -> list[str]:
        ids = list(ids)
        cache = self.cache
        if not cache.keys() >= set(ids):
            self.prepare(ids)
        return [cache[i] for i in ids]

    def table(self, ids: torch.Tensor) -> list[Any]:
        """`ids` (any shape) as nested lists of strings, through one numpy lookup."""
        self.prepare(ids.unique().tolist())
        known = sorted(self.cache)
        lookup = np.empty(len(known), dtype=object)
        lookup[:] = [self.cache[i] for i in known]
        where = np.searchsorted(np.asarray(known), ids.numpy())
        return lookup[where].tolist()


class Example(NamedTuple):
    """One context: its tokens and the feature's activation on each, cut at its row's edges."""

    tokens: list[str]
    acts: list[float]
    at: int
    """Index in `tokens` of the activating token."""
    value: float
    """The activation there."""


class FeatureExamples(NamedTuple):
    """A feature's contexts: the top ones, and per interval `(low, high, examples)`."""

    top: list[Example]
    intervals: list[tuple[float, float, list[Example]]]


def interval_edges(stats: FeatureStatistics) -> torch.Tensor:
    """The `n_intervals + 1` interval edges of every feature `[F, n + 1]` (float64).

    `quantile`: true quantiles of its nonzero activations, exact when all of them are in the random
    sample (it fires at most `n_samples` times), else from the fine histogram (within one fine bin,
    max / 512 at worst). `equal_width`: [min, max] of its nonzero activations in equal parts.
    """
    cfg = stats.config
    levels = torch.linspace(0, 1, cfg.n_intervals + 1, dtype=torch.float64)
    low, high = stats.minimum.double(), stats.maximum.double()
    if cfg.interval_kind == "equal_width":
        return low[:, None] + (high - low)[:, None] * levels[None, :]
    edges = stats.histogram.quantiles(levels, low, high)
    exact = ((stats.count > 0) & (stats.count <= cfg.n_samples)).nonzero().squeeze(1)
    for start in range(0, exact.numel(), 4096):
        rows = exact[start : start + 4096]
        kept = stats.samples.values[rows].double().cpu()
        kept[stats.samples.positions[rows].cpu() < 0] = math.nan
        edges[rows] = torch.nanquantile(kept, levels, dim=1).T
    return edges


def _window_examples(
    stats: FeatureStatistics,
    kept: _KeptActivations,
    rows: torch.Tensor,
    slots: torch.Tensor,
    strings: TokenStrings,
) -> list[Example]:
    """The kept entries `(rows[i], slots[i])` of `kept` as `Example`s, all windows read at once."""
    if rows.numel() == 0:
        return []
    cfg, context = stats.config, stats.context_size
    positions = kept.positions[rows, slots].cpu()
    token_row, at = positions // context, positions % context
    start = (at - cfg.context_before).clamp_min(0)
    stop = (at + cfg.context_after + 1).clamp_max(context)
    columns = (at[:, None] + torch.arange(-cfg.context_before, cfg.context_after + 1)[None, :]).clamp(
        0, context - 1
    )
    words = strings.table(stats.token_rows[token_row[:, None], columns].long())
    acts = kept.windows[rows, slots].cpu().tolist()
    values = kept.values[rows, slots].cpu().tolist()
    offset = (start - (at - cfg.context_before)).tolist()
    length = (stop - start).tolist()
    qualifying = (at - start).tolist()
    return [
        Example(w[o : o + n], a[o : o + n], q, v)
        for w, a, o, n, q, v in zip(words, acts, offset, length, qualifying, values, strict=True)
    ]


def _split(items: list[Example], rows: torch.Tensor, n_rows: int) -> list[list[Example]]:
    """`items` (ordered by `rows`) as one list per row."""
    counts = torch.bincount(rows, minlength=n_rows).tolist()
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out


def feature_examples(stats: FeatureStatistics, strings: TokenStrings) -> list[FeatureExamples]:
    """Every requested feature's top examples (best first) and interval examples.

    Interval examples are drawn uniformly at random from the candidates that fall in each interval:
    the random sample, plus the top activations it lacks (so the sparse top of an equal-width range
    is not left empty). An interval shows fewer than `n_examples_per_interval` when fewer candidates
    fall in it. Intervals run from low to high; examples within one from high to low.
    """
    cfg = stats.config
    n_features = stats.features.numel()
    top, sample = stats.top, stats.samples
    order = top.sorted_slots().cpu()
    filled = top.positions.cpu().gather(1, order) >= 0
    top_rows, ranks = filled.nonzero(as_tuple=True)
    top_lists = _split(
        _window_examples(stats, top, top_rows, order[top_rows, ranks], strings), top_rows, n_features
    )
    if cfg.n_examples_per_interval == 0:
        return [FeatureExamples(t, []) for t in top_lists]

    edges = interval_edges(stats)
    n = cfg.n_intervals
    sample_positions, top_positions = sample.positions.cpu(), top.positions.cpu()
    # A top entry that is also in the sample must not be a candidate twice.
    duplicate = torch.zeros_like(top_positions, dtype=torch.bool)
    for start in range(0, n_features, 1024):
        part = slice(start, start + 1024)
        duplicate[part] = (top_positions[part, :, None] == sample_positions[part, None, :]).any(-1)
    values = torch.cat([sample.values.cpu(), top.values.cpu()], dim=1).double()
    valid = torch.cat([sample_positions >= 0, (top_positions >= 0) & ~duplicate], dim=1)
    bucket = torch.searchsorted(edges[:, 1:-1].contiguous(), values, right=True)
    bucket[~valid] = n
    # Group each row's candidates by interval in a random order within the group; the first
    # n_examples_per_interval of each group are the draw.
    generator = torch.Generator().manual_seed(cfg.seed)
    shuffled = torch.argsort(
        bucket.double() + torch.rand(bucket.shape, generator=generator, dtype=torch.float64), dim=1
    )
    grouped = bucket.gather(1, shuffled)
    rank = torch.arange(grouped.shape[1])[None, :] - torch.searchsorted(grouped, grouped)
    rows, columns = ((rank < cfg.n_examples_per_interval) & (grouped < n)).nonzero(as_tuple=True)
    candidate, interval = shuffled[rows, columns], grouped[rows, columns]
    # Display order: feature, interval, activation (descending).
    order = torch.argsort(-values[rows, candidate], stable=True)
    order = order[torch.argsort(interval[order], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, candidate, interval = rows[order], candidate[order], interval[order]
    n_sample = sample.size
    from_sample = candidate < n_sample
    picked: list[Example | None] = [None] * rows.numel()
    for mask, kept, slots in (
        (from_sample, sample, candidate),
        (~from_sample, top, candidate - n_sample),
    ):
        where = mask.nonzero().squeeze(1)
        for i, example in zip(
            where.tolist(), _window_examples(stats, kept, rows[where], slots[where], strings), strict=True
        ):
            picked[i] = example
    per_feature = _split(picked, rows, n_features)  # type: ignore[arg-type]
    intervals_of = interval.tolist()
    edge_lists = edges.tolist()
    out, start = [], 0
    for row in range(n_features):
        groups: list[list[Example]] = [[] for _ in range(n)]
        for example in per_feature[row]:
            groups[intervals_of[start]].append(example)
            start += 1
        intervals = (
            [(edge_lists[row][j], edge_lists[row][j + 1], groups[j]) for j in range(n)]
            if stats.count[row] > 0
            else []
        )
        out.append(FeatureExamples(top_lists[row], intervals))
    return out


def _top_pairs(indices: torch.Tensor, values: torch.Tensor) -> list[list[list[Any]]]:
    """Per row, `[[index, value], ...]` with non-finite values dropped."""
    return [
        [[i, v] for i, v in zip(row_i, row_v, strict=True) if math.isfinite(v)]
        for row_i, row_v in zip(indices.tolist(), values.tolist(), strict=True)
    ]


def correlated_features(stats: FeatureStatistics, k: int, chunk: int = 1024) -> list[list[list[Any]]]:
    """Per requested feature, its `k` most correlated requested features `[[index, pearson], ...]`."""
    if stats.coactivation is None or k == 0 or stats.features.numel() < 2:
        return [[] for _ in range(stats.features.numel())]
    k = min(k, stats.features.numel() - 1)
    out: list[list[list[Any]]] = []
    for start in range(0, stats.features.numel(), chunk):
        rows = torch.arange(start, min(start + chunk, stats.features.numel()))
        corr = stats.correlations(rows)
        corr = torch.where(corr.isfinite(), corr, -math.inf)
        corr[torch.arange(rows.numel()), rows] = -math.inf
        values, found = corr.topk(k, dim=1)
        out += _top_pairs(stats.features[found.cpu()], values.cpu())
    return out


def dashboard_data(
    stats: FeatureStatistics,
    sae: SparseAutoencoder,
    model: Any,
    *,
    name: str,
    hook_name: str | None = None,
    title: str | None = None,
    prompt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dashboard schema of `sae_lens.html.dashboard` for the collected features.

    Adds the nearest features by decoder cosine over the whole dictionary and the logit effects
    (`W_dec[i] @ W_U`, or the tied embeddings for an encoder model; None when neither applies).
    """
    cfg = stats.config
    meta = sae.cfg.metadata
    hook_name = hook_name or meta.get("hook_name", "")
    strings = TokenStrings(model.tokenizer)
    W_dec = sae.W_dec.detach()
    near = (
        _top_pairs(*nearest_by_decoder(W_dec, stats.features, cfg.n_nearest))
        if cfg.n_nearest
        else [[] for _ in range(stats.features.numel())]
    )
    correlated = correlated_features(stats, cfg.n_correlated)
    unembed, logit_source = unembedding(model, sae.cfg.output_width)
    logits: list[dict[str, Any] | None] = [None] * stats.features.numel()
    if unembed is not None and cfg.n_logits:
        top_ids, top_values, bottom_ids, bottom_values = logit_effects(
            W_dec[stats.features.to(W_dec.device)], unembed, cfg.n_logits
        )
        strings.prepare(torch.cat([top_ids.flatten(), bottom_ids.flatten()]).tolist())
        logits = [
            {
                "top": [list(p) for p in zip(strings(ti), tv, strict=True)],
                "bottom": [list(p) for p in zip(strings(bi), bv, strict=True)],
            }
            for ti, tv, bi, bv in zip(
                top_ids.tolist(),
                top_values.tolist(),
                bottom_ids.tolist(),
                bottom_values.tolist(),
                strict=True,
            )
        ]
    else:
        logit_source = None
    density, mean = stats.density().tolist(), stats.mean().tolist()
    features = []
    for row, (index, examples) in enumerate(
        zip(stats.features.tolist(), feature_examples(stats, strings), strict=True)
    ):
        edges, counts = stats.histogram.display(
            row, float(stats.minimum[row]), float(stats.maximum[row]), cfg.n_histogram_bins
        )
        features.append(
            {
                "index": index,
                "density": density[row],
                "max_act": float(stats.maximum[row]),
                "mean_act": mean[row],
                "top_examples": [{"tokens": e.tokens, "acts": e.acts} for e in examples.top],
                "intervals": [
                    {
                        "low": low,
                        "high": high,
                        "examples": [{"tokens": e.tokens, "acts": e.acts} for e in group],
                    }
                    for low, high, group in examples.intervals
                ],
                "histogram": {"edges": edges, "counts": counts},
                "logits": logits[row],
                "nearest": near[row],
                "correlated": correlated[row],
            }
        )
    return {
        "title": title or f"{name} · {hook_name}",
        "sae": sae_summary(sae, name, hook_name),
        "n_tokens": stats.n_tokens,
        "interval_kind": cfg.interval_kind,
        "logit_source": logit_source,
        "features": features,
        "prompt": prompt,
    }


def sae_summary(sae: SparseAutoencoder, name: str, hook_name: str) -> dict[str, Any]:
    """The schema's `sae` dict: what the page header says about the SAE."""
    return {
        "name": name,
        "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "model_name": str(sae.cfg.metadata.get("model_name", "")),
        "hook_name": hook_name,
    }


# -- the prompt-centric view ------------------------------------------------------------------------


@torch.no_grad()
def prompt_features(
    sae: SparseAutoencoder, store: ActivationsStore, text: str, k: int = 5, show_special_tokens: bool = False
) -> dict[str, Any]:
    """Each token of `text` with its `k` strongest features: the schema's prompt dict.

    The text is tokenized without special tokens and fed as the model saw its rows (the start token
    first when the store prepends BOS). Special tokens have no features unless the store keeps them;
    the prepended start token is shown only with `show_special_tokens`.
    """
    tokenizer = store.model.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SAELensError("the prompt is empty: it has no tokens")
    prefix = [store.start_token_id] if store.prepend_bos else []
    tokens = torch.tensor([prefix + ids], dtype=torch.long)
    feature_acts = sae.encode(store.get_activations(tokens))[0]
    feature_acts[
        torch.isin(tokens[0].to(feature_acts.device), store.excluded_token_ids.to(feature_acts.device))
    ] = 0
    k = min(k, sae.cfg.d_sae)
    values, found = feature_acts.topk(k, dim=-1)
    first = 0 if show_special_tokens else len(prefix)
    strings = TokenStrings(tokenizer)
    strings.prepare(tokens[0].tolist())
    top = [
        [[f, v] for f, v in zip(row_f, row_v, strict=True) if v > 0]
        for row_f, row_v in zip(found[first:].tolist(), values[first:].tolist(), strict=True)
    ]
    return {"text": text, "tokens": strings(tokens[0, first:].tolist()), "top_features": top}


__all__ = [
    "DashboardConfig",
    "FeatureStatistics",
    "check_model_matches",
    "collect_feature_statistics",
    "dashboard_data",
    "iter_token_batches",
    "logit_effects",
    "make_store",
    "nearest_by_decoder",
    "parse_features",
    "prompt_features",
    "sae_summary",
    "unembedding",
    "validate_features",
]
