"""`language_model_sae_runner`: model -> activations store -> SAE(s) -> trainer(s) -> saved folders.

The whole main path of a run, top to bottom. One run trains one SAE, or several from one forward pass
per batch (a sweep of hyperparameters and/or hook points, `LanguageModelSAERunnerConfig.sweep`): the
model runs once, stops after the deepest hooked block, and every SAE trains on the same batches with
its own training state, logging, output folder and final eval.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_lens import distributed
from sae_lens.activations_store import ActivationsStore, DatasetExhausted
from sae_lens.atomic_files import atomic_write_bytes, atomic_write_text, ensure_writable_folder
from sae_lens.cached_activations import CachedActivationsStore, read_manifest
from sae_lens.config import LanguageModelSAERunnerConfig, is_hook_pattern
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance, model_metrics, reconstruction_metrics
from sae_lens.metrics_logger import MetricsLogger
from sae_lens.models import check_context_fits, check_fits_model, hook_layer_of, load_model
from sae_lens.saes.sae import SparseAutoencoder
from sae_lens.text_datasets import detect_column, load_text_dataset
from sae_lens.training.checkpoint import read_checkpoint, set_rng_state, write_checkpoint
from sae_lens.training.stopping import GracefulStop, TrainingDiverged, TrainingInterrupted
from sae_lens.training.trainer import SAETrainer

log = logging.getLogger("sae_lens")

Store = ActivationsStore | CachedActivationsStore
"""Where a run's batches come from: the model, or an activation cache."""

TRAINING_CONFIG_FILENAME = "training_config.yaml"
CHECKPOINTS_FOLDER = "checkpoints"

# What the SAEs of one run must share: they are trained on the same batches of the same model pass.
SHARED_FIELDS = (
    "model_name",
    "dataset_path",
    "dataset_split",
    "streaming",
    "context_size",
    "prepend_bos",
    "exclude_special_tokens",
    "n_eval_sequences",
    "store_batch_size",
    "n_batches_in_buffer",
    "train_batch_size",
    "total_training_tokens",
    "device",
    "model_dtype",
    "dtype",
    "seed",
    "checkpoint_path",
    "n_checkpoints",
)


@dataclass
class RunResult:
    """What a run produced for one SAE: the SAE, its folder, and the final held-out metrics."""

    sae: SparseAutoencoder
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens_trained: int = 0
    seconds: float = 0.0
    ran_out_of_data: bool = False
    lr: float = 0.0
    """The base learning rate trained with (what `lr="auto"` resolved to)."""
    dead_in_training: float = 0.0
    """Share of the latents that did not fire for the trainer's whole dead-latent window at the end."""
    decoder_refit: dict[str, float] = field(default_factory=dict)
    """What the closing decoder refit did (`SAETrainer.refit_report`: tokens, seconds, the squared
    error of the kept tokens before and after, the held-out explained variance before and after);
    empty when there was none or it was undone."""
    warnings: list[str] = field(default_factory=list)
    """What the end-of-training check found wrong (dead latents, a rising loss, a low explained
    variance), one line each with its fix; also logged."""


def language_model_sae_runner(cfg: LanguageModelSAERunnerConfig) -> Any:
    """Train the SAE(s) `cfg` describes, save them, and return the SAE (a list for a sweep)."""
    results = train_saes(cfg)
    return results[0].sae if len(results) == 1 else [result.sae for result in results]


def train_sae(cfg: LanguageModelSAERunnerConfig, model: Any = None, show_progress: bool = True) -> RunResult:
    """Train and save one SAE; returns it with its output folder and final metrics.

    The output folder `checkpoint_path/run_name` holds the SAE (`cfg.json`,
    `sae_weights.safetensors`, `sparsity.safetensors`), `training_config.yaml` and `metrics.jsonl`.
    """
    results = train_saes(cfg, model=model, show_progress=show_progress)
    if len(results) != 1:
        raise SAELensError(f"the config describes {len(results)} SAEs (a sweep); use train_saes for it")
    return results[0]


@dataclass
class _Run:
    """One SAE of a run, with everything it owns."""

    cfg: LanguageModelSAERunnerConfig
    name: str
    output_dir: Path
    sae: SparseAutoencoder
    trainer: SAETrainer
    logger: MetricsLogger | None


def train_saes(
    configs: LanguageModelSAERunnerConfig | list[LanguageModelSAERunnerConfig],
    model: Any = None,
    show_progress: bool = True,
) -> list[RunResult]:
    """Train every SAE that `configs` describe (a sweep is expanded) from one model pass per batch."""
    started = time.perf_counter()
    cfgs = _expand(configs)
    base = cfgs[0]
    distributed.init_from_env(base.device)
    rank0 = distributed.is_main_process()
    # Everything that can be checked without running the model is checked first, cheapest first.
    ensure_writable_folder(base.checkpoint_path, "checkpoint_path")
    checkpoint = read_checkpoint(base.resume_from_checkpoint) if base.resume_from_checkpoint else None
    cached = base.use_cached_activations
    if cached:
        if not base.cached_activations_path:
            raise SAELensError(
                "use_cached_activations needs cached_activations_path (a folder written by sae-lens cache)"
            )
        manifest = read_manifest(base.cached_activations_path)
        context_size = int(manifest.get("context_size") or base.context_size)
    else:
        dataset = load_text_dataset(base.dataset_path, split=base.dataset_split, streaming=base.streaming)
        detect_column(dataset)
        dataset = distributed.shard_dataset(dataset)
        context_size = base.context_size
    if model is None:
        for cfg in cfgs:
            for hook in _hooks_of(cfg):
                check_fits_model(
                    cfg.model_name, context_size, None if is_hook_pattern(hook) else hook_layer_of(hook)
                )
        model = load_model(
            base.model_name, device=distributed.local_device(base.device), dtype=base.model_dtype
        )
    else:
        check_context_fits(model, context_size)
    cfgs = _expand_hook_patterns(cfgs, model)

    hooks = list(dict.fromkeys(hook for cfg in cfgs for hook in _hooks_of(cfg)))
    torch.manual_seed(base.seed)
    store: Store
    if cached:
        # Every rank reads its own subset of the shards; the cache is checked against the config.
        store = CachedActivationsStore.from_config(base, hook_points=hooks)
        held_out = store.held_out_activations_by_hook()
        if held_out is None:
            raise SAELensError(
                "the activation cache has no held-out rows; write it with n_eval_sequences > 0"
            )
        eval_tokens, eval_acts = store.eval_tokens, {hook: acts.float() for hook, acts in held_out.items()}
    else:
        store = ActivationsStore.from_config(model, base, dataset=dataset, hook_points=hooks)
        if store.eval_tokens is None:
            raise SAELensError("n_eval_sequences must be positive for a run to report held-out metrics")
        eval_tokens = store.eval_tokens
        eval_acts = held_out_activations_by_hook(store, eval_tokens)
    _apply_memory_budget(store, base, {hook: acts.shape[-1] for hook, acts in eval_acts.items()})
    spread = base.distribute_saes and distributed.is_distributed()
    if spread and len(cfgs) < distributed.world_size():
        raise SAELensError(
            f"distribute_saes spreads {len(cfgs)} SAEs over {distributed.world_size()} ranks, which leaves ranks "
            "idle; train at least as many SAEs as ranks, or turn distribute_saes off"
        )
    # The folder name is decided once (rank 0's), so every rank writes to the same place.
    group_dir = Path(distributed.gather_objects(str(_group_dir(cfgs, checkpoint, eval_acts)))[0])
    if checkpoint is None and rank0:
        _refuse_existing_run(group_dir)
        if len(cfgs) > 1:
            # The whole sweep, unexpanded, so `--resume_from_checkpoint` finds every SAE's settings.
            sweep = _sweep_config(configs)
            if sweep is not None:
                group_dir.mkdir(parents=True, exist_ok=True)
                sweep.to_yaml(group_dir / TRAINING_CONFIG_FILENAME)
    if checkpoint is not None:
        _check_resumable(configs, group_dir)
    names = list(checkpoint["trainers"]) if checkpoint is not None and len(cfgs) == 1 else None
    resumed_step = int(checkpoint["manifest"]["step"]) if checkpoint is not None else None
    owned = [
        index
        for index in range(len(cfgs))
        if not spread or index % distributed.world_size() == distributed.rank()
    ]
    runs = [
        _build_run(
            cfgs[index],
            index,
            cfgs,
            group_dir,
            model,
            eval_tokens,
            eval_acts,
            show_progress and (rank0 or spread),
            names,
            owner=rank0 or spread,
            data_parallel=not spread,
            resumed_step=resumed_step,
        )
        for index in owned
    ]
    if checkpoint is not None:
        _restore(runs, store, checkpoint)

    checkpoint_dir = group_dir / CHECKPOINTS_FOLDER

    def save_checkpoint() -> Path | None:
        # Every rank's store position (and, with distribute_saes, its SAEs) is gathered; rank 0 writes.
        stores = distributed.gather_objects(store.state_dict())
        states = {run.name: run.trainer.state.state_dict() for run in runs}
        writers: dict[str, Callable[[Path], Any]] = {run.name: run.trainer.write_sae_folder for run in runs}
        if spread:
            folders = {run.name: run.trainer.sae_folder_contents() for run in runs}
            states = {
                name: state for part in distributed.gather_objects(states) for name, state in part.items()
            }
            gathered = {
                name: data for part in distributed.gather_objects(folders) for name, data in part.items()
            }
            writers = {name: _folder_writer(data) for name, data in gathered.items()}
        if not rank0:
            return None
        step = runs[0].trainer.n_steps
        if (checkpoint_dir / f"step_{step}" / "checkpoint.json").is_file():
            return checkpoint_dir / f"step_{step}"  # a stop on a checkpoint step: written already
        path = write_checkpoint(
            checkpoint_dir / f"step_{step}",
            sae_writers=writers,
            training_states=states,
            step=step,
            tokens=runs[0].trainer.n_tokens,
            extra={"store": stores[0], "stores": stores},
        )
        runs[0].trainer._prune_checkpoints(checkpoint_dir)
        return path

    try:
        _train(runs, store, save_checkpoint, gather=spread)
    except TrainingInterrupted as interrupted:
        # The checkpoint is written; keep the SAEs trained so far too (raw scale).
        for run in runs:
            run.trainer.finalise()
            if run.logger is not None:
                interrupted.sae_folders.append(
                    run.sae.save_model(run.output_dir, run.trainer.log10_feature_density())
                )
        raise
    finally:
        for run in runs:
            if run.logger is not None:
                run.logger.close()

    results = []
    for run in runs:
        if run.trainer.ran_out_of_data:
            log.warning(
                "the dataset ran out after %d of %d training tokens; saved the SAE trained so far",
                run.trainer.n_tokens,
                run.cfg.total_training_tokens,
            )
        if run.logger is not None:  # the process that owns this SAE's folder
            run.sae.save_model(run.output_dir, run.trainer.log10_feature_density())
        metrics = {
            key.removeprefix("eval/"): value
            for key, value in run.trainer.last_eval.items()
            if not isinstance(value, torch.Tensor)
        }
        warnings = run.trainer.warnings() if run.logger is not None else []
        for warning in warnings:
            log.warning("%s: %s", run.name, warning)
        results.append(
            RunResult(
                sae=run.sae,
                output_dir=run.output_dir,
                metrics=metrics,
                tokens_trained=run.trainer.n_tokens,
                seconds=time.perf_counter() - started,
                ran_out_of_data=run.trainer.ran_out_of_data,
                lr=run.trainer.state.lr,
                dead_in_training=run.trainer.dead_latents().float().mean().item(),
                decoder_refit=dict(run.trainer.refit_report),
                warnings=warnings,
            )
        )
    return results


def _next_batch(store: Store, gather: bool) -> dict[str, torch.Tensor] | None:
    """The next batch of every hook, or None once any rank has run out (so all ranks stop together).
    With `gather`, every rank's batch is concatenated (each rank trains its own SAEs on all of them)."""
    try:
        batch: dict[str, torch.Tensor] | None = store.next_batch_by_hook()
    except DatasetExhausted:
        batch = None
    if not distributed.all_ranks(batch is not None) or batch is None:
        return None
    return {hook: distributed.gather_rows(value) for hook, value in batch.items()} if gather else batch


def _train(
    runs: list[_Run],
    store: Store,
    save_checkpoint: Callable[[], Path | None],
    gather: bool = False,
) -> None:
    """The loop: one model pass per batch, one step of every SAE on it."""
    first_cfg = runs[0].cfg
    total_steps = first_cfg.total_training_steps
    n = first_cfg.n_checkpoints
    checkpoint_steps = {round(total_steps * (i + 1) / (n + 1)) for i in range(n)} if n else set()
    stop = GracefulStop()
    policies = [run.trainer.allocator_policy() for run in runs[:1]]  # process-wide: decided once
    with policies[0], stop:
        batch = _next_batch(store, gather)
        if batch is None:
            raise SAELensError("no activations to train on: the dataset produced no tokens")
        for run in runs:
            run.trainer.begin(*_inputs(run, batch))
        step = runs[0].trainer.n_steps
        while step < total_steps:
            _step_all(runs, batch, gather)
            step = runs[0].trainer.n_steps
            if step in checkpoint_steps:
                save_checkpoint()
            if distributed.any_rank(stop.requested is not None):
                raise TrainingInterrupted(stop.requested or 2, step, save_checkpoint())
            if step >= total_steps or (batch := _next_batch(store, gather)) is None:
                break
        for run in runs:
            run.trainer.end()


def _step_all(runs: list[_Run], batch: dict[str, torch.Tensor], gather: bool) -> None:
    """One step of every SAE. With distribute_saes a divergence on one rank stops every rank (the
    others would wait for it at the next collective)."""
    failures = []
    for run in runs:
        x, target = _inputs(run, batch)
        try:
            run.trainer.step(x, target)
        except TrainingDiverged as error:
            if not gather:
                raise
            failures.append(str(error))
    if gather and distributed.any_rank(bool(failures)):
        reports = [message for part in distributed.gather_objects(failures) for message in part]
        raise TrainingDiverged(reports[0])


def _inputs(run: _Run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = batch[run.cfg.hook_point]
    out = run.cfg.hook_point_out
    return x, (batch[out] if out and out != run.cfg.hook_point else None)


# -- building the runs ------------------------------------------------------------------------------


def _expand(
    configs: LanguageModelSAERunnerConfig | list[LanguageModelSAERunnerConfig],
) -> list[LanguageModelSAERunnerConfig]:
    given = configs if isinstance(configs, list) else [configs]
    cfgs = [single for cfg in given for single in cfg.expand()]
    if not cfgs:
        raise SAELensError("no SAE to train: the config list is empty")
    for cfg in cfgs[1:]:
        different = [name for name in SHARED_FIELDS if getattr(cfg, name) != getattr(cfgs[0], name)]
        if different:
            raise SAELensError(
                f"SAEs trained together share one batch stream, so they must agree on {', '.join(different)}; "
                "train them in separate runs"
            )
    return cfgs


def _hooks_of(cfg: LanguageModelSAERunnerConfig) -> list[str]:
    return [cfg.hook_point] + ([cfg.hook_point_out] if cfg.hook_point_out else [])


def _expand_hook_patterns(
    cfgs: list[LanguageModelSAERunnerConfig], model: Any
) -> list[LanguageModelSAERunnerConfig]:
    """Each config whose hook_point is a pattern becomes one config per matching hook of the model."""
    names = list(model.hook_dict)
    expanded = []
    for cfg in cfgs:
        if not is_hook_pattern(cfg.hook_point):
            expanded.append(cfg)
            continue
        matches = [name for name in names if fnmatch.fnmatchcase(name, cfg.hook_point)]
        if not matches:
            raise SAELensError(f"hook pattern {cfg.hook_point!r} matches no hook of {cfg.model_name}")
        # Numeric order of the blocks (blocks.10 after blocks.9).
        matches.sort(key=lambda name: (hook_layer_of(name) or 0, name))
        expanded += [type(cfg)(**{**cfg.to_dict(), "hook_point": hook}) for hook in matches]
    return expanded


def _apply_memory_budget(store: Store, cfg: LanguageModelSAERunnerConfig, widths: dict[str, int]) -> None:
    """Lower the buffer's size in batches so all hooks together fit `max_buffer_memory_mb`."""
    if cfg.max_buffer_memory_mb is None:
        return
    width = sum(widths.values())
    element = torch.empty((), dtype=store.dtype).element_size()
    bytes_per_batch = cfg.train_batch_size * width * element
    # A refill reads whole model passes, so the buffer can hold up to one pass beyond its size.
    one_pass = cfg.store_batch_size * cfg.context_size * width * element
    fits = int((cfg.max_buffer_memory_mb * 2**20 - one_pass) // bytes_per_batch)
    if fits < 2:
        raise SAELensError(
            f"max_buffer_memory_mb={cfg.max_buffer_memory_mb} holds fewer than 2 batches of "
            f"{cfg.train_batch_size} tokens x {width} activations ({bytes_per_batch / 2**20:.1f} MB each, plus "
            f"{one_pass / 2**20:.1f} MB for one model pass); raise it or lower train_batch_size"
        )
    store.n_batches_in_buffer = min(store.n_batches_in_buffer, fits)


def _group_dir(
    cfgs: list[LanguageModelSAERunnerConfig],
    checkpoint: dict[str, Any] | None,
    eval_acts: dict[str, torch.Tensor],
) -> Path:
    """The folder a run writes into: the SAE's own folder for one SAE, a folder of SAE folders for several."""
    base = cfgs[0]
    if checkpoint is not None:
        # checkpoints/step_N inside the run folder the checkpoint belongs to.
        return Path(base.resume_from_checkpoint or "").resolve().parent.parent
    if len(cfgs) == 1:
        d_sae = base.resolved_d_sae(eval_acts[base.hook_point].shape[-1])
        return Path(base.checkpoint_path) / (base.run_name or default_run_name(base, d_sae))
    return Path(base.checkpoint_path) / (base.run_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")


def _run_name(
    cfg: LanguageModelSAERunnerConfig, index: int, cfgs: list[LanguageModelSAERunnerConfig], group_dir: Path
) -> str:
    """The SAE's name: its run folder's for one SAE; for a sweep, its index and the values that vary."""
    if len(cfgs) == 1:
        return group_dir.name
    varying = [
        name
        for name, value in cfg.to_dict().items()
        if name not in ("run_name", "sweep") and any(other.to_dict().get(name) != value for other in cfgs)
    ]
    parts = [f"{name}={cfg.to_dict()[name]}" for name in varying]
    return f"{index:02d}-" + ("-".join(parts) or cfg.architecture).replace("/", "_")


def _build_run(
    cfg: LanguageModelSAERunnerConfig,
    index: int,
    cfgs: list[LanguageModelSAERunnerConfig],
    group_dir: Path,
    model: Any,
    eval_tokens: torch.Tensor | None,
    eval_acts: dict[str, torch.Tensor],
    show_progress: bool,
    names: list[str] | None = None,
    owner: bool = True,
    data_parallel: bool = True,
    resumed_step: int | None = None,
) -> _Run:
    d_in = eval_acts[cfg.hook_point].shape[-1]
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise SAELensError(
            f"d_in={cfg.d_in} does not match the model: {cfg.hook_point} has width {d_in}; fix d_in or leave it unset"
        )
    transcoder = bool(cfg.hook_point_out) and cfg.hook_point_out != cfg.hook_point
    if transcoder and cfg.normalize_activations != "none":
        raise SAELensError("normalize_activations is not supported for transcoders yet; set it to none")
    d_out = eval_acts[cfg.hook_point_out].shape[-1] if transcoder and cfg.hook_point_out else None
    # Seeded per SAE, so every SAE of a sweep starts exactly as its own single run would.
    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder.from_config(cfg.sae_config(d_in, d_out=d_out))
    name = names[index] if names is not None else _run_name(cfg, index, cfgs, group_dir)
    output_dir = group_dir if len(cfgs) == 1 else group_dir / name
    logger = None
    if owner:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            cfg.to_yaml(output_dir / TRAINING_CONFIG_FILENAME)
        else:
            # Before the logger opens the file: what a killed run logged after the checkpoint goes.
            _truncate_metrics(output_dir / "metrics.jsonl", resumed_step)
        logger = MetricsLogger(
            output_dir,
            use_wandb=cfg.log_to_wandb,
            wandb_project=cfg.wandb_project,
            run_name=name,
            config=cfg.to_dict(),
        )
    evaluator = _evaluator(cfg, model, eval_tokens, eval_acts) if owner else None
    trainer = SAETrainer(
        cfg,
        sae,
        evaluator=evaluator,
        logger=logger,
        show_progress=show_progress,
        name=name,
        data_parallel=data_parallel,
    )
    return _Run(cfg, name, output_dir, sae, trainer, logger)


def _evaluator(
    cfg: LanguageModelSAERunnerConfig,
    model: Any,
    eval_tokens: torch.Tensor | None,
    eval_acts: dict[str, torch.Tensor],
) -> Callable[[SparseAutoencoder, float], dict[str, Any]]:
    x = eval_acts[cfg.hook_point]
    target = (
        eval_acts[cfg.hook_point_out] if cfg.hook_point_out and cfg.hook_point_out != cfg.hook_point else None
    )

    def evaluate(current: SparseAutoencoder, scale: float) -> dict[str, Any]:
        if target is not None:
            # A transcoder: its output against the output hook's activations.
            with torch.no_grad():
                out = current(x)
            return {
                "eval/explained_variance": explained_variance(target, out),
                "eval/l0": (current.encode(x) != 0).sum(-1).float().mean().item(),
            }
        metrics = reconstruction_metrics(current, x * scale)
        if eval_tokens is not None:  # an HF dataset of activations has no token rows
            metrics.update(model_metrics(model, current, eval_tokens, cfg.hook_point, scale))
        density = metrics.pop("feature_density")
        return {
            **{f"eval/{k}": v for k, v in metrics.items()},
            "eval/log10_feature_density": torch.log10(density + 1e-10),
        }

    return evaluate


# -- resuming ---------------------------------------------------------------------------------------


def saved_run_config(checkpoint: str | Path) -> Path:
    """The `training_config.yaml` of the run a checkpoint belongs to (for `--resume_from_checkpoint`)."""
    folder = Path(checkpoint).resolve().parent.parent
    path = folder / TRAINING_CONFIG_FILENAME
    if not path.is_file():
        candidates = sorted(folder.glob(f"*/{TRAINING_CONFIG_FILENAME}"))
        if not candidates:
            raise SAELensError(
                f"found no {TRAINING_CONFIG_FILENAME} for checkpoint {str(checkpoint)!r}; pass --config too"
            )
        path = candidates[0]
    return path


def _restore(runs: list[_Run], store: Store, checkpoint: dict[str, Any]) -> None:
    """Load every SAE's training state, the store's position and the RNG states from a checkpoint."""
    states = checkpoint["trainers"]
    names = [run.name for run in runs]
    everyone = sorted(name for part in distributed.gather_objects(names) for name in part)
    if sorted(states) != everyone:
        raise SAELensError(
            f"the checkpoint holds SAEs {sorted(states)}, but this run trains {everyone}; resume with "
            "the configuration the checkpoint was written with"
        )
    for run in runs:
        try:
            run.trainer.state.load_state_dict(states[run.name])
        except (RuntimeError, ValueError, KeyError) as error:
            reason = str(error).strip().splitlines()[0]
            raise SAELensError(f"the checkpoint does not fit SAE {run.name!r} ({reason})") from None
    stores = checkpoint.get("stores") or [checkpoint["store"]]
    store.load_state_dict(stores[distributed.rank()] if len(stores) > distributed.rank() else stores[0])
    set_rng_state(checkpoint["rng"])


# Settings a resume may change: where and how a run reports and checkpoints, not what it trains.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume_from_checkpoint",
        "checkpoint_path",
        "device",
        "log_to_wandb",
        "wandb_project",
        "wandb_log_frequency",
        "eval_every_n_wandb_logs",
        "n_checkpoints",
        "keep_last_n_checkpoints",
        "max_buffer_memory_mb",
        "divergence_factor",
        "distribute_saes",
    }
)


def _refuse_existing_run(group_dir: Path) -> None:
    """A fresh run must not write over a finished or interrupted one (its SAE, log and checkpoints)."""
    taken = [
        name
        for name in ("cfg.json", TRAINING_CONFIG_FILENAME, CHECKPOINTS_FOLDER)
        if (group_dir / name).exists()
    ]
    if taken:
        raise SAELensError(
            f"{group_dir} already holds a run ({', '.join(taken)}); resume it with --resume_from_checkpoint "
            "or choose another run_name"
        )


def _sweep_config(
    configs: LanguageModelSAERunnerConfig | list[LanguageModelSAERunnerConfig],
) -> LanguageModelSAERunnerConfig | None:
    """The one config a multi-SAE run was started from (None for a list of configs: it has no one file)."""
    return configs if isinstance(configs, LanguageModelSAERunnerConfig) else None


def _check_resumable(
    configs: LanguageModelSAERunnerConfig | list[LanguageModelSAERunnerConfig],
    group_dir: Path,
) -> None:
    """Refuse a resume whose training settings differ from the run's saved ones: the checkpoint would
    carry on under the old ones while the config says otherwise."""
    saved_path = group_dir / TRAINING_CONFIG_FILENAME
    given = _sweep_config(configs)
    if given is None or not saved_path.is_file():
        return
    saved = LanguageModelSAERunnerConfig.from_yaml(saved_path).to_dict()
    wanted = given.to_dict()
    changed = sorted(
        name
        for name in set(saved) | set(wanted)
        if name not in RESUME_MAY_CHANGE and saved.get(name) != wanted.get(name)
    )
    if changed:
        shown = ", ".join(f"{name} {saved.get(name)!r} -> {wanted.get(name)!r}" for name in changed)
        raise SAELensError(
            f"this resume changes {shown} from the run being resumed; a checkpoint continues the run it was "
            "written by, so resume with its settings or start a new run"
        )


def _folder_writer(files: dict[str, bytes]) -> Callable[[Path], Path]:
    """Write an SAE folder from `SAETrainer.sae_folder_contents` (cfg.json last, as `write_sae_folder` does)."""

    def write(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(files, key=lambda name: name == "cfg.json"):
            atomic_write_bytes(folder / name, files[name])
        return folder

    return write


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from (they are logged again)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if (logged := _logged_step(line)) is not None and logged <= step
    ]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _logged_step(line: str) -> int | None:
    """The step of one metrics line; None for a line a kill cut short (it is dropped)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


# -- helpers ------------------------------------------------------------------------------------------


def held_out_activations(store: ActivationsStore, tokens: torch.Tensor) -> torch.Tensor:
    """Activations of held-out rows `[n_tokens, d_in]` at the store's first hook, excluded tokens dropped."""
    return held_out_activations_by_hook(store, tokens)[store.hook_point]


def held_out_activations_by_hook(store: ActivationsStore, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{hook: [n_tokens, d_hook]}` for held-out rows, excluded tokens dropped."""
    parts = [store.kept_activations_by_hook(tokens[i : i + 8]) for i in range(0, tokens.shape[0], 8)]
    return {hook: torch.cat([part[hook] for part in parts]).float() for hook in store.hook_points}


def default_run_name(cfg: LanguageModelSAERunnerConfig, d_sae: int | None) -> str:
    """`<architecture>-<d_sae>-<hook_point>-<timestamp>`; unique per second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    width = d_sae if d_sae is not None else (cfg.d_sae or f"{cfg.expansion_factor}x")
    return f"{cfg.architecture}-{width}-{cfg.hook_point}-{stamp}"


__all__ = [
    "RunResult",
    "held_out_activations",
    "language_model_sae_runner",
    "saved_run_config",
    "train_sae",
    "train_saes",
]
