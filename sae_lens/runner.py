"""`language_model_sae_runner`: model -> activations store -> SAE -> trainer -> saved folder.

The whole main path of a run, top to bottom, in one function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_lens.activations_store import ActivationsStore
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.evals import model_metrics, reconstruction_metrics
from sae_lens.metrics_logger import MetricsLogger
from sae_lens.models import load_model
from sae_lens.saes.sae import SAEConfig, SparseAutoencoder
from sae_lens.training.trainer import SAETrainer

log = logging.getLogger("sae_lens")


@dataclass
class RunResult:
    """What a run produced: the SAE, its folder, and the final held-out metrics."""

    sae: SparseAutoencoder
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens_trained: int = 0
    seconds: float = 0.0
    ran_out_of_data: bool = False


def language_model_sae_runner(cfg: LanguageModelSAERunnerConfig) -> SparseAutoencoder:
    """Train an SAE as `cfg` describes, save it, and return it (see `train_sae` for the details)."""
    return train_sae(cfg).sae


def train_sae(cfg: LanguageModelSAERunnerConfig, model: Any = None, show_progress: bool = True) -> RunResult:
    """Train and save an SAE; returns the SAE with its output folder and final metrics.

    The output folder `checkpoint_path/run_name` holds the SAE (`cfg.json`,
    `sae_weights.safetensors`, `sparsity.safetensors`), `training_config.yaml` and `metrics.jsonl`.
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if model is None:
        model = load_model(cfg.model_name, device=cfg.device, dtype=cfg.model_dtype)
    store = ActivationsStore.from_config(model, cfg)
    if store.eval_tokens is None:
        raise SAELensError("n_eval_sequences must be positive for a run to report held-out metrics")
    eval_tokens = store.eval_tokens
    eval_acts = held_out_activations(store, eval_tokens)
    d_in = eval_acts.shape[-1]
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise SAELensError(
            f"d_in={cfg.d_in} does not match the model: {cfg.hook_point} has width {d_in}; "
            "fix d_in or leave it unset"
        )
    sae = SparseAutoencoder.from_config(SAEConfig.from_runner_config(cfg, d_in=d_in))

    run_name = cfg.run_name or default_run_name(cfg, sae.cfg.d_sae)
    output_dir = Path(cfg.checkpoint_path) / run_name
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(output_dir / "training_config.yaml")
    logger = MetricsLogger(
        output_dir,
        use_wandb=cfg.log_to_wandb,
        wandb_project=cfg.wandb_project,
        run_name=run_name,
        config=cfg.to_dict(),
    )

    def evaluator(current: SparseAutoencoder, scale: float) -> dict[str, Any]:
        metrics = reconstruction_metrics(current, eval_acts * scale)
        metrics.update(model_metrics(model, current, eval_tokens, cfg.hook_point, scale))
        density = metrics.pop("feature_density")
        return {
            **{f"eval/{k}": v for k, v in metrics.items()},
            "eval/log10_feature_density": torch.log10(density + 1e-10),
        }

    trainer = SAETrainer(
        cfg,
        sae,
        evaluator=evaluator,
        logger=logger,
        checkpoint_dir=output_dir / "checkpoints",
        show_progress=show_progress,
    )
    try:
        trainer.fit(store)
    finally:
        logger.close()
    if trainer.ran_out_of_data:
        log.warning(
            "the dataset ran out after %d of %d training tokens; saved the SAE trained so far",
            trainer.n_tokens,
            cfg.total_training_tokens,
        )
    sae.save_model(output_dir, trainer.log10_feature_density())
    metrics = {
        key.removeprefix("eval/"): value
        for key, value in trainer.last_eval.items()
        if not isinstance(value, torch.Tensor)
    }
    return RunResult(
        sae=sae,
        output_dir=output_dir,
        metrics=metrics,
        tokens_trained=trainer.n_tokens,
        seconds=time.perf_counter() - started,
        ran_out_of_data=trainer.ran_out_of_data,
    )


def held_out_activations(store: ActivationsStore, tokens: torch.Tensor) -> torch.Tensor:
    """Activations of held-out rows `[n_tokens, d_in]`, with the store's excluded tokens dropped."""
    return torch.cat(
        [store.kept_activations(tokens[i : i + 8]) for i in range(0, tokens.shape[0], 8)]
    ).float()


def default_run_name(cfg: LanguageModelSAERunnerConfig, d_sae: int) -> str:
    """`<architecture>-<d_sae>-<hook_point>-<timestamp>`; unique per second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.architecture}-{d_sae}-{cfg.hook_point}-{stamp}"
