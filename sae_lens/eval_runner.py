"""`run_evals`: every metric of an SAE on a stream of token rows, in one pass over the data.

Read top to bottom this is one eval batch's path: token rows -> valid-token mask (special tokens
dropped) -> one clean forward pass capturing the SAE's input (and, for a transcoder, its target)
-> the SAE applied to the valid tokens in chunks, its sums added to float64 accumulators -> two
more forward passes (SAE spliced in, hook zero-ablated) that replace only the valid positions, for
CE/KL (causal LMs) or the pooled-embedding cosine (encoders). Nothing but the accumulators
outlives a batch, so memory stays bounded for any number of tokens. Formulas: docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_lens.activations_store import ActivationsStore, DatasetExhausted
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.config_fields import option, optional, positive_int, validate_fields
from sae_lens.errors import SAELensError
from sae_lens.evals import (
    DENSE_DENSITY,
    ce_loss_score,
    embedding_cosine_score,
    eval_excluded_token_ids,
    explained_variance_legacy_per_token,
    feature_weight_metrics,
    kl_div_score,
    kl_divergence,
    masked_mean_pool,
    masked_splice_hook,
    masked_zero_ablate_hook,
    next_token_log_probs,
    next_token_nll,
    prediction_mask,
    sae_input_view,
    valid_token_mask,
)
from sae_lens.models import hook_layer_of, is_causal_lm, validate_hook_point
from sae_lens.saes.sae import SparseAutoencoder
from sae_lens.text_datasets import load_text_dataset

log = logging.getLogger("sae_lens")

SAE_CHUNK_ELEMENTS = 1 << 24
"""Latents materialised at once (tokens x d_sae): 64 MB of float32, whatever the batch size."""


@dataclass
class EvalConfig:
    """What `run_evals` measures and on how many tokens. Every group is on by default."""

    n_eval_tokens: int | None = option(None, optional(positive_int))
    """Read rows until this many tokens (rows x context, before exclusions); unset: every row given
    (for a store: its held-out rows)."""
    n_eval_batches: int | None = option(None, optional(positive_int))
    """Read at most this many batches of `batch_size` rows."""
    batch_size: int = option(8, positive_int)
    """Rows per forward pass; also the batch whose mean `explained_variance_legacy` centres on."""
    exclude_special_tokens: bool = True
    """Drop BOS/EOS/CLS/SEP/PAD/UNK positions from every metric (the splice keeps them as they were)."""
    compute_ce_kl: bool = True
    """Splice the SAE into the model: CE/KL for causal LMs, the pooled-embedding cosine for encoders
    (two extra forward passes per batch)."""
    compute_reconstruction: bool = True
    """explained_variance (centred and legacy), mse and cossim."""
    compute_shrinkage: bool = True
    """l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias."""
    compute_sparsity: bool = True
    """l0 and l1."""
    compute_feature_metrics: bool = True
    """Per-latent density, mean and max activation, and weight statistics."""
    show_progress: bool = True
    """A tqdm bar with tokens/s."""

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def needs_activations(self) -> bool:
        """Whether any metric needs the model's activations (the weight statistics do not)."""
        return (
            self.compute_ce_kl
            or self.compute_reconstruction
            or self.compute_shrinkage
            or self.compute_sparsity
            or self.compute_feature_metrics
        )


@dataclass
class EvalResult:
    """What `run_evals` measured: metric groups named as SAELens 6 names them, per-latent tensors."""

    metrics: dict[str, dict[str, float]]
    """Groups: model_behavior_preservation, model_performance_preservation (causal LMs) or
    embedding_preservation (encoders), reconstruction_quality, shrinkage, sparsity, token_stats."""
    feature_metrics: dict[str, torch.Tensor] | None = None
    """`[d_sae]` float32 tensors by name (density, mean_activation, ...), or None when switched off."""
    feature_summary: dict[str, float] | None = None
    """Scalars over latents: dead/dense fractions, decoder and encoder norm statistics."""
    seconds: float = 0.0
    """Wall time of the evaluation."""

    @property
    def tokens_per_second(self) -> float:
        """Tokens read (rows x context) per second of evaluation."""
        read = self.metrics.get("token_stats", {}).get("total_tokens_read", 0)
        return read / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: NaN becomes None (JSON has no NaN) and tensors become lists."""
        out: dict[str, Any] = {"metrics": _json_ready(self.metrics)}
        if self.feature_metrics is not None:
            out["feature_metrics"] = {
                "summary": _json_ready(self.feature_summary or {}),
                # float32 values: 7 significant digits hold all they have (and halve the file).
                "per_feature": {
                    name: _json_ready([float(f"{value:.7g}") for value in t.tolist()])
                    for name, t in self.feature_metrics.items()
                },
            }
        out["speed"] = {"seconds": self.seconds, "tokens_per_second": _json_ready(self.tokens_per_second)}
        return out


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- where the SAE reads and writes ----------------------------------------------------------------


@dataclass(frozen=True)
class HookPlan:
    """The hooks an SAE is evaluated at: it reads `read_hook` (one head of it when `head_index` is
    set) and replaces `write_hook`, the same hook except for a transcoder (`hook_name_out`)."""

    read_hook: str
    write_hook: str
    head_index: int | None = None

    @property
    def is_transcoder(self) -> bool:
        """Whether the SAE's target is another hook's activation than its input."""
        return self.write_hook != self.read_hook

    @classmethod
    def of(cls, sae: SparseAutoencoder, hook_name: str | None = None) -> HookPlan:
        """From the SAE's metadata (`hook_name`, `hook_name_out`, `hook_head_index`); `hook_name`
        overrides where it reads (and, for an SAE, writes)."""
        metadata = sae.cfg.metadata
        read = hook_name or metadata.get("hook_name")
        if not read:
            raise SAELensError("the SAE's metadata names no hook_name; pass the hook to evaluate at (--hook)")
        write = metadata.get("hook_name_out") if sae.cfg.is_transcoder else None
        return cls(read_hook=read, write_hook=write or read, head_index=metadata.get("hook_head_index"))


# -- streaming accumulators ------------------------------------------------------------------------


class ActivationAccumulator:
    """Float64 running sums over valid tokens for the reconstruction, shrinkage, sparsity and
    per-latent metrics. `x` is the SAE's target (its input, or a transcoder's output hook), `x_hat`
    its output, `f` its latents.

    The centred explained variance needs Σ‖x - x̄‖² with x̄ the mean over ALL tokens, known only at
    the end; each batch's mean and squared spread about it are merged into running ones (Chan et
    al.'s pairwise update, the numerically safe form of Σ‖x‖² - N‖x̄‖²).
    """

    def __init__(self, d_out: int, d_sae: int, per_feature: bool, device: torch.device) -> None:
        self.device = device
        self.n = 0
        self.mean = torch.zeros(d_out, dtype=torch.float64, device=device)
        self.spread = 0.0  # Σ‖x - x̄‖² about the running mean
        self.sums: dict[str, float] = dict.fromkeys(
            (
                "squared_error",
                "cossim",
                "legacy_ev",
                "legacy_n",
                "norm_in",
                "norm_out",
                "norm_ratio",
                "norm_ratio_n",
                "out_squared",
                "in_dot_out",
                "l0",
                "l1",
            ),
            0.0,
        )
        self.per_feature = per_feature
        if per_feature:
            self.fire_count = torch.zeros(d_sae, dtype=torch.float64, device=device)
            self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
            self.act_max = torch.full((d_sae,), -math.inf, dtype=torch.float64, device=device)

    def add_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Merge one eval batch's targets `[n, d]` into the running mean and spread; returns the
        batch's own mean `[d]` (float64), the centre of `explained_variance_legacy`."""
        x = x.to(self.device, torch.float64)
        n_batch = x.shape[0]
        batch_mean = x.mean(dim=0)
        batch_spread = (x - batch_mean).pow(2).sum().item()
        total = self.n + n_batch
        delta = batch_mean - self.mean
        self.spread += batch_spread + delta.pow(2).sum().item() * self.n * n_batch / total
        self.mean += delta * (n_batch / total)
        self.n = total
        return batch_mean

    def add_chunk(
        self, x: torch.Tensor, x_hat: torch.Tensor, feature_acts: torch.Tensor, batch_mean: torch.Tensor
    ) -> None:
        """Add the sums of a chunk of one batch: targets and outputs `[n, d]`, latents `[n, d_sae]`."""
        x, x_hat = x.to(self.device, torch.float64), x_hat.to(self.device, torch.float64)
        # Half-precision sums would round to 3 significant digits.
        feature_acts = feature_acts.to(self.device, torch.float32)
        sums = self.sums
        error = (x - x_hat).pow(2).sum(-1)
        sums["squared_error"] += error.sum().item()
        sums["cossim"] += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
        # SAEBench's per-token form; a token at the batch mean has no value (see the docs).
        legacy = explained_variance_legacy_per_token(x, x_hat, batch_mean)
        defined = ~legacy.isnan()
        sums["legacy_ev"] += legacy[defined].sum().item()
        sums["legacy_n"] += defined.sum().item()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        sums["norm_in"] += norm_in.sum().item()
        sums["norm_out"] += norm_out.sum().item()
        nonzero = norm_in > 0
        sums["norm_ratio"] += (norm_out[nonzero] / norm_in[nonzero]).sum().item()
        sums["norm_ratio_n"] += nonzero.sum().item()
        sums["out_squared"] += norm_out.pow(2).sum().item()
        sums["in_dot_out"] += (x * x_hat).sum().item()
        # Per-chunk reductions over [chunk, d_sae] stay in float32 / int32 (a float64 or int64 copy
        # of the latents would cost more than the SAE itself); only their totals are float64.
        fired = (feature_acts != 0).sum(dim=0, dtype=torch.int32)
        sums["l0"] += fired.sum().item()
        sums["l1"] += feature_acts.abs().sum().item()
        if self.per_feature:
            self.fire_count += fired
            self.act_sum += feature_acts.sum(dim=0)
            self.act_max = torch.maximum(self.act_max, feature_acts.max(dim=0).values.double())

    def reconstruction_quality(self) -> dict[str, float]:
        """explained_variance (centred), explained_variance_legacy, mse, cossim."""
        s, n = self.sums, self.n
        d = self.mean.shape[0]
        return {
            "explained_variance": 1 - s["squared_error"] / self.spread if self.spread > 0 else math.nan,
            "explained_variance_legacy": s["legacy_ev"] / s["legacy_n"] if s["legacy_n"] else math.nan,
            "mse": s["squared_error"] / (n * d),
            "cossim": s["cossim"] / n,
        }

    def shrinkage(self) -> dict[str, float]:
        """l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias."""
        s, n = self.sums, self.n
        bias = s["out_squared"] / s["in_dot_out"] if s["in_dot_out"] else math.nan
        return {
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["norm_ratio"] / s["norm_ratio_n"] if s["norm_ratio_n"] else math.nan,
            "relative_reconstruction_bias": bias,
        }

    def sparsity(self) -> dict[str, float]:
        """l0 (latents != 0 per token) and l1 (Σ|f| per token)."""
        return {"l0": self.sums["l0"] / self.n, "l1": self.sums["l1"] / self.n}

    def feature_metrics(self) -> dict[str, torch.Tensor]:
        """Per-latent `[d_sae]` float32 tensors: density, mean_activation (over all tokens),
        mean_activation_when_active (NaN for a latent that never fired) and max_activation."""
        count = self.fire_count
        when_active = torch.where(count > 0, self.act_sum / count.clamp_min(1), torch.nan)
        return {
            "density": (count / self.n).float().cpu(),
            "mean_activation": (self.act_sum / self.n).float().cpu(),
            "mean_activation_when_active": when_active.float().cpu(),
            "max_activation": self.act_max.float().cpu(),
        }


class DownstreamAccumulator:
    """Token-weighted sums for CE and KL (causal LMs), row-weighted sums for the embedding cosine."""

    def __init__(self) -> None:
        self.ce = {"clean": 0.0, "sae": 0.0, "ablated": 0.0}
        self.kl = {"sae": 0.0, "ablated": 0.0}
        self.n_predictions = 0
        self.cosine = {"sae": 0.0, "ablated": 0.0}
        self.n_rows = 0
        self.n_spliced = 0

    def causal_metrics(self) -> dict[str, dict[str, float]]:
        """The two SAELens 6 groups from the sums."""
        n = self.n_predictions
        ce, kl = _means(self.ce, n), _means(self.kl, n)
        return {
            "model_behavior_preservation": {
                "kl_div_score": kl_div_score(kl["sae"], kl["ablated"]),
                "kl_div_with_sae": kl["sae"],
                "kl_div_with_ablation": kl["ablated"],
            },
            "model_performance_preservation": {
                "ce_loss_score": ce_loss_score(ce["clean"], ce["sae"], ce["ablated"]),
                "ce_loss_with_sae": ce["sae"],
                "ce_loss_without_sae": ce["clean"],
                "ce_loss_with_ablation": ce["ablated"],
            },
        }

    def encoder_metrics(self) -> dict[str, dict[str, float]]:
        """The embedding_preservation group from the sums."""
        cosine = _means(self.cosine, self.n_rows)
        return {
            "embedding_preservation": {
                "embedding_cosine_score": embedding_cosine_score(cosine["sae"], cosine["ablated"]),
                "embedding_cosine_with_sae": cosine["sae"],
                "embedding_cosine_with_ablation": cosine["ablated"],
            }
        }


def _means(sums: dict[str, float], n: int) -> dict[str, float]:
    """Each sum over `n`; NaN for all when nothing was counted."""
    return {name: value / n if n else math.nan for name, value in sums.items()}


# -- forward passes --------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed is captured."""


def _forward(
    model: Any,
    tokens: torch.Tensor,
    capture: list[str],
    fwd_hooks: list[tuple[str, Callable]] | None = None,
    need_logits: bool = False,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward pass with `fwd_hooks`, returning the logits (when `need_logits`) and the
    activations at the `capture` hooks.

    Without logits the pass stops as soon as every captured hook has fired, so the blocks after
    them (and an encoder's vocab-sized MLM head) never run. Each capture is its own closure: a
    bridge may report an aliased hook under its canonical name.
    """
    wanted = list(dict.fromkeys(capture))
    captured: dict[str, torch.Tensor] = {}

    def capturing(name: str) -> Callable[..., None]:
        def hook(activation: torch.Tensor, hook: Any = None) -> None:
            captured[name] = activation.detach()
            if not need_logits and len(captured) == len(wanted):
                raise _StopForward

        return hook

    hooks = [*(fwd_hooks or []), *((name, capturing(name)) for name in wanted)]
    logits = None
    with contextlib.suppress(_StopForward):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    missing = [name for name in wanted if name not in captured]
    if missing:
        raise SAELensError(f"hook {missing[0]!r} never fired in the model's forward pass; pick another hook")
    return (logits if need_logits else None), captured


def _sae_chunks(
    sae: SparseAutoencoder, x: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """`(rows, feature_acts, sae_out)` for chunks of `x` `[n, d_in]`, each small enough that its
    latents stay under `SAE_CHUNK_ELEMENTS`; `sae_out` is `sae(x)`, the skip path included."""
    step = max(1, SAE_CHUNK_ELEMENTS // sae.cfg.d_sae)
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        chunk = x[rows].to(sae.device)
        feature_acts = sae.encode(chunk)
        out = sae.decode(feature_acts)
        if sae.cfg.skip_connection:
            out = out + sae.skip(chunk)
        yield rows, feature_acts, out


def _model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _accumulator_device(device: torch.device) -> torch.device:
    # The float64 sums stay where the activations are, except on MPS, which has no float64.
    return torch.device("cpu") if device.type == "mps" else device


# -- checks before any work ------------------------------------------------------------------------


def check_compatible(sae: SparseAutoencoder, model: Any, plan: HookPlan, probe_tokens: torch.Tensor) -> None:
    """Raise a one-line SAELensError unless `model` has the SAE's hooks with the SAE's widths.

    Runs the model on `probe_tokens` (a few tokens of one row) up to the hooks only.
    """
    for name in dict.fromkeys((plan.read_hook, plan.write_hook)):
        validate_hook_point(model, name)
    _, captured = _forward(model, probe_tokens, [plan.read_hook, plan.write_hook])
    read = captured[plan.read_hook]
    model_name = sae.cfg.metadata.get("model_name") or "another model"
    if plan.head_index is not None:
        if read.ndim != 4:
            raise SAELensError(
                f"the SAE reads head {plan.head_index} but {plan.read_hook} is not a per-head hook "
                f"(shape {tuple(read.shape)}); unset hook_head_index or pick an attn.hook_z-style hook"
            )
        if not 0 <= plan.head_index < read.shape[2]:
            raise SAELensError(
                f"the SAE reads head {plan.head_index} but {plan.read_hook} has {read.shape[2]} heads"
            )
    widths = [(plan.read_hook, sae_input_view(read, plan.head_index).shape[-1], sae.cfg.d_in, "d_in")]
    if plan.is_transcoder:
        out_width = sae_input_view(captured[plan.write_hook]).shape[-1]
        widths.append((plan.write_hook, out_width, sae.cfg.output_width, "d_out"))
    elif sae.cfg.output_width != sae.cfg.d_in:
        raise SAELensError(
            f"the SAE writes {sae.cfg.output_width}-wide outputs but reads {sae.cfg.d_in}-wide inputs and "
            "its metadata names no hook_name_out; set metadata hook_name_out for a transcoder"
        )
    for hook, width, expected, name in widths:
        if width != expected:
            raise SAELensError(
                f"the SAE's {name}={expected} does not match the model: {hook} has width {width} "
                f"(the SAE was trained on {model_name}); pass the SAE's model or the right hook"
            )


# -- token rows ------------------------------------------------------------------------------------


def _row_limit(cfg: EvalConfig, context: int) -> int | None:
    """Rows to read: ceil(n_eval_tokens / context) and n_eval_batches x batch_size, the smaller."""
    limits = []
    if cfg.n_eval_tokens is not None:
        limits.append(-(-cfg.n_eval_tokens // context))
    if cfg.n_eval_batches is not None:
        limits.append(cfg.n_eval_batches * cfg.batch_size)
    return min(limits) if limits else None


def _tensor_batches(tokens: torch.Tensor, cfg: EvalConfig) -> Iterator[torch.Tensor]:
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise SAELensError(
            f"tokens must be a [rows, context] integer tensor of token ids, got {tokens.dtype} "
            f"of shape {tuple(tokens.shape)}"
        )
    limit = _row_limit(cfg, tokens.shape[1])
    rows = tokens[:limit] if limit is not None else tokens
    for start in range(0, rows.shape[0], cfg.batch_size):
        yield rows[start : start + cfg.batch_size]


def _store_batches(store: ActivationsStore, cfg: EvalConfig) -> Iterator[torch.Tensor]:
    """Batches of `batch_size` rows: the store's held-out rows first, then, only when more are
    asked for, the rows that follow them in its stream."""
    held_out = store.eval_tokens if store.eval_tokens is not None else torch.empty(0, store.context_size)
    limit = _row_limit(cfg, store.context_size)
    if limit is None and held_out.shape[0]:
        limit = held_out.shape[0]
    pending = held_out[:limit].long() if limit is not None else held_out.long()
    served = pending.shape[0]
    size = cfg.batch_size
    while True:
        while pending.shape[0] >= size:
            yield pending[:size]
            pending = pending[size:]
        want = size - pending.shape[0] if limit is None else min(size - pending.shape[0], limit - served)
        if want <= 0:
            break
        if served == held_out.shape[0] > 0:
            log.warning(
                "evaluating rows beyond the store's %d held-out rows: training may have used them",
                held_out.shape[0],
            )
        try:
            fresh = store.get_batch_tokens(want)
        except DatasetExhausted:
            break
        served += fresh.shape[0]
        pending = torch.cat([pending, fresh.long()])
    if pending.shape[0]:
        yield pending


def eval_store(
    model: Any,
    sae: SparseAutoencoder,
    dataset: Iterable[dict[str, Any]] | None = None,
    *,
    dataset_path: str | None = None,
    hook_name: str | None = None,
    context_size: int | None = None,
    n_held_out_rows: int = 32,
    batch_size: int = 8,
    device: str | None = None,
) -> ActivationsStore:
    """An `ActivationsStore` packing the SAE's dataset as its training did, for `run_evals`.

    The dataset (`dataset`, else `dataset_path`, else the SAE's `metadata["dataset_path"]`), the
    hook, `context_size` and `prepend_bos` come from the SAE's metadata unless given. Its first
    `n_held_out_rows` rows, the rows the trainer holds out with `n_eval_sequences`, are `eval_tokens`.
    """
    metadata = sae.cfg.metadata
    path = dataset_path or metadata.get("dataset_path")
    if dataset is None and not path:
        raise SAELensError("the SAE's metadata names no dataset_path; pass a dataset (--dataset)")
    context = context_size or metadata.get("context_size")
    if not context:
        raise SAELensError("the SAE's metadata names no context_size; pass one (--context-size)")
    plan = HookPlan.of(sae, hook_name)
    layer = hook_layer_of(plan.read_hook)
    cfg = LanguageModelSAERunnerConfig(
        model_name=metadata.get("model_name") or "unknown",
        hook_point=plan.read_hook,
        hook_point_layer=layer if layer is not None else 0,
        dataset_path=path or "unused",
        context_size=int(context),
        prepend_bos=bool(metadata.get("prepend_bos", True)),
        n_eval_sequences=n_held_out_rows,
        store_batch_size=batch_size,
        device=device or str(_model_device(model)),
    )
    if dataset is None:
        dataset = _load_dataset(cfg.dataset_path)
    return ActivationsStore.from_config(model, cfg, dataset=dataset)


def _load_dataset(path: str) -> Any:
    """`load_text_dataset`, with the `datasets` library's failure on a file it cannot build rows
    from (an empty .txt, say) turned into one line."""
    import datasets

    try:
        return load_text_dataset(path)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise SAELensError(f"dataset {path!r} holds no readable documents ({reason}); is it empty?") from None


def _row_batches(
    tokens_or_store: Any, model: Any, sae: SparseAutoencoder, cfg: EvalConfig, hook_name: str | None
) -> tuple[Iterator[torch.Tensor], int | None]:
    """The eval batches of `[rows, context]` tokens and, when known, the number of tokens to read."""
    if isinstance(tokens_or_store, torch.Tensor):
        batches = _tensor_batches(tokens_or_store, cfg)
        limit = _row_limit(cfg, tokens_or_store.shape[-1])
        rows = tokens_or_store.shape[0] if limit is None else min(limit, tokens_or_store.shape[0])
        return batches, rows * tokens_or_store.shape[-1]
    store = tokens_or_store
    if not isinstance(store, ActivationsStore):
        store = eval_store(model, sae, tokens_or_store, hook_name=hook_name, batch_size=cfg.batch_size)
    limit = _row_limit(cfg, store.context_size)
    if limit is None and store.eval_tokens is not None:
        limit = store.eval_tokens.shape[0]
    return _store_batches(store, cfg), (limit * store.context_size if limit is not None else None)


# -- the evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def run_evals(
    sae: SparseAutoencoder,
    model: Any,
    tokens_or_store: Any,
    cfg: EvalConfig | None = None,
    hook_name: str | None = None,
) -> EvalResult:
    """Evaluate `sae` on `model` over token rows, streaming; see docs/metrics.md for every formula.

    `tokens_or_store`: a `[rows, context]` LongTensor, an `ActivationsStore` (its held-out
    `eval_tokens` first; further rows only when `cfg` asks for more), or a dataset of documents,
    packed by `eval_store` with the SAE's metadata. The SAE reads `metadata["hook_name"]` (or
    `hook_name`), one head of it with `hook_head_index`; a transcoder writes `hook_name_out`.
    Raises SAELensError before any work when the model does not fit the SAE or there are no tokens.
    """
    # Inference behaviour (BatchTopK uses its threshold, not the batch's top k), restored after.
    was_training = sae.training
    sae.eval()
    try:
        return _run_evals(sae, model, tokens_or_store, cfg or EvalConfig(), hook_name)
    finally:
        sae.train(was_training)


def _run_evals(
    sae: SparseAutoencoder, model: Any, tokens_or_store: Any, cfg: EvalConfig, hook_name: str | None
) -> EvalResult:
    started = time.perf_counter()
    plan = HookPlan.of(sae, hook_name)
    result = EvalResult(metrics={})
    weight_metrics = feature_weight_metrics(sae) if cfg.compute_feature_metrics else {}
    if not cfg.needs_activations:
        result.metrics["token_stats"] = _token_stats(0, 0, 0, 0)
        result.feature_metrics = weight_metrics
        result.feature_summary = _feature_summary(None, weight_metrics)
        result.seconds = time.perf_counter() - started
        return result

    batches, total_tokens = _row_batches(tokens_or_store, model, sae, cfg, hook_name)
    first = next(batches, None)
    if first is None or first.numel() == 0:
        raise SAELensError("there are no tokens to evaluate: the dataset or token tensor is empty")
    check_compatible(sae, model, plan, first[:1, : min(first.shape[1], 4)].to(_model_device(model)))

    causal = is_causal_lm(model)
    excluded = eval_excluded_token_ids(model.tokenizer, cfg.exclude_special_tokens)
    device = _model_device(model)
    activations = ActivationAccumulator(
        sae.cfg.output_width, sae.cfg.d_sae, cfg.compute_feature_metrics, _accumulator_device(device)
    )
    downstream = DownstreamAccumulator()
    final_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    n_rows = n_read = 0
    progress = tqdm(
        total=total_tokens, desc="eval", unit="tok", unit_scale=True, disable=not cfg.show_progress
    )
    try:
        for batch in itertools.chain([first], batches):
            tokens = batch.long().to(device)
            _evaluate_batch(
                sae, model, tokens, plan, cfg, excluded, causal, final_hook, activations, downstream
            )
            n_rows += tokens.shape[0]
            n_read += tokens.numel()
            progress.update(tokens.numel())
    finally:
        progress.close()
    if activations.n == 0:
        raise SAELensError(
            f"no tokens left to evaluate: all {n_read} tokens read are special tokens; "
            "use more data or turn exclude_special_tokens off"
        )

    if cfg.compute_ce_kl:
        result.metrics.update(downstream.causal_metrics() if causal else downstream.encoder_metrics())
    if cfg.compute_reconstruction:
        result.metrics["reconstruction_quality"] = activations.reconstruction_quality()
    if cfg.compute_shrinkage:
        result.metrics["shrinkage"] = activations.shrinkage()
    if cfg.compute_sparsity:
        result.metrics["sparsity"] = activations.sparsity()
    spliced = downstream.n_predictions if causal else downstream.n_spliced
    result.metrics["token_stats"] = _token_stats(
        n_rows, n_read, activations.n, spliced if cfg.compute_ce_kl else 0
    )
    if cfg.compute_feature_metrics:
        result.feature_metrics = {**activations.feature_metrics(), **weight_metrics}
        result.feature_summary = _feature_summary(result.feature_metrics["density"], weight_metrics)
    result.seconds = time.perf_counter() - started
    return result


def _evaluate_batch(
    sae: SparseAutoencoder,
    model: Any,
    tokens: torch.Tensor,
    plan: HookPlan,
    cfg: EvalConfig,
    excluded: torch.Tensor,
    causal: bool,
    final_hook: str,
    activations: ActivationAccumulator,
    downstream: DownstreamAccumulator,
) -> None:
    """All metrics' sums for one batch `[rows, context]`: one clean pass, then (CE/KL) two spliced ones."""
    valid = valid_token_mask(tokens, excluded)
    if not valid.any():
        return
    capture = [plan.read_hook, plan.write_hook]
    if cfg.compute_ce_kl and not causal:
        capture.append(final_hook)
    clean_logits, captured = _forward(model, tokens, capture, need_logits=cfg.compute_ce_kl and causal)
    x = sae_input_view(captured[plan.read_hook], plan.head_index)[valid]
    # The target: what the SAE reconstructs, or a transcoder's output hook (all heads concatenated).
    target = sae_input_view(captured[plan.write_hook])[valid] if plan.is_transcoder else x
    batch_mean = activations.add_batch(target)
    clean_final = captured.get(final_hook) if cfg.compute_ce_kl and not causal else None
    outputs = []
    for rows, feature_acts, out in _sae_chunks(sae, x):
        activations.add_chunk(target[rows], out, feature_acts, batch_mean)
        if cfg.compute_ce_kl:
            outputs.append(out)
    del captured
    if not cfg.compute_ce_kl:
        return

    # In a spliced pass the SAE's input upstream of the hook is unchanged, so its output computed
    # from the clean pass is exactly what it would produce there (and a transcoder's output hook
    # comes after its input). Only valid positions are replaced; special tokens keep theirs.
    replacement = torch.cat(outputs)
    write_head = plan.head_index if not plan.is_transcoder else None
    spliced_hooks = {
        "sae": masked_splice_hook(replacement, valid, write_head),
        "ablated": masked_zero_ablate_hook(valid, write_head),
    }
    if causal:
        predictions = prediction_mask(valid)
        assert clean_logits is not None
        clean = next_token_log_probs(clean_logits, predictions)
        del clean_logits
        downstream.ce["clean"] += next_token_nll(clean, tokens, predictions).sum().item()
        for name, hook in spliced_hooks.items():
            logits, _ = _forward(model, tokens, [], [(plan.write_hook, hook)], need_logits=True)
            assert logits is not None
            log_probs = next_token_log_probs(logits, predictions)
            del logits
            downstream.ce[name] += next_token_nll(log_probs, tokens, predictions).sum().item()
            downstream.kl[name] += kl_divergence(clean, log_probs).sum().item()
        downstream.n_predictions += int(predictions.sum().item())
        return
    # Encoders: rows keep only their valid positions in the mean-pooled embedding.
    assert clean_final is not None
    clean_pooled = masked_mean_pool(clean_final, valid)
    rows_with_tokens = valid.any(dim=1)
    for name, hook in spliced_hooks.items():
        _, final = _forward(model, tokens, [final_hook], [(plan.write_hook, hook)])
        pooled = masked_mean_pool(final[final_hook], valid)
        cosine = F.cosine_similarity(pooled[rows_with_tokens], clean_pooled[rows_with_tokens], dim=-1)
        downstream.cosine[name] += cosine.sum().item()
    downstream.n_rows += int(rows_with_tokens.sum().item())
    downstream.n_spliced += int(valid.sum().item())


def _token_stats(n_rows: int, n_read: int, n_valid: int, n_spliced: int) -> dict[str, float]:
    return {
        "total_rows": n_rows,
        "total_tokens_read": n_read,
        "total_tokens_excluded": n_read - n_valid,
        "total_tokens_eval_sparsity_variance": n_valid,
        "total_tokens_eval_reconstruction": n_spliced,
    }


def _feature_summary(density: torch.Tensor | None, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    summary: dict[str, float] = {}
    if density is not None:
        summary["dead_fraction"] = (density == 0).float().mean().item()
        summary["dense_fraction"] = (density > DENSE_DENSITY).float().mean().item()
        summary["mean_log10_density"] = torch.log10(density.double() + 1e-10).mean().item()
    for name in ("decoder_norm", "encoder_norm"):
        values = weights[name].double()
        summary.update(
            {
                f"{name}_mean": values.mean().item(),
                f"{name}_std": values.std().item() if values.numel() > 1 else 0.0,
                f"{name}_min": values.min().item(),
                f"{name}_max": values.max().item(),
            }
        )
    if "encoder_decoder_cosine" in weights:
        summary["encoder_decoder_cosine_mean"] = weights["encoder_decoder_cosine"].double().mean().item()
    return summary


__all__ = [
    "ActivationAccumulator",
    "DownstreamAccumulator",
    "EvalConfig",
    "EvalResult",
    "HookPlan",
    "check_compatible",
    "eval_store",
    "run_evals",
]
