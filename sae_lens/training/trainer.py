"""The one training loop. Every architecture trains here; they differ only in
`training_forward_pass`.

One step: scale the batch -> forward with losses -> backward -> drop the decoder-parallel gradient
-> Adam -> renormalise the decoder -> LR schedule -> update the dead-latent counters -> log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens import cpu_memory
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.geometric_median import geometric_median
from sae_lens.metrics_logger import MetricsLogger
from sae_lens.saes.sae import SparseAutoencoder, latent_fire_counts
from sae_lens.training.lr_schedules import build_lr_lambda

Evaluator = Callable[[SparseAutoencoder, float], dict[str, Any]]
"""Called as `evaluator(sae, input_scale)`; returns metrics to log (tensors are logged as histograms)."""


class SAETrainer:
    """Trains `sae` on any iterable of `[batch, d_in]` activation tensors.

    `evaluator`, when given, runs every `eval_every_n_wandb_logs` logs and at the end; `logger`
    receives every metric; `checkpoint_dir` receives `n_checkpoints` evenly spaced checkpoints.
    After `fit`, the SAE takes raw activations (an input scale used in training is folded in).
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig,
        sae: SparseAutoencoder,
        *,
        evaluator: Evaluator | None = None,
        logger: MetricsLogger | None = None,
        checkpoint_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.sae = sae
        self.evaluator = evaluator
        self.logger = logger
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.show_progress = show_progress
        self.optimizer = torch.optim.Adam(
            sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, build_lr_lambda(cfg))
        d_sae = sae.cfg.d_sae
        self.steps_since_fired = torch.zeros(d_sae, dtype=torch.long, device=sae.device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64, device=sae.device)
        self.window_fire_counts = torch.zeros(d_sae, dtype=torch.float64, device=sae.device)
        self.window_tokens = 0
        self.input_scale = 1.0
        self.n_steps = 0
        self.n_tokens = 0
        self.last_eval: dict[str, Any] = {}
        self.ran_out_of_data = False
        self._reuse_freed_memory()

    # -- the loop -------------------------------------------------------------------------------

    def fit(self, activation_batches: Iterable[torch.Tensor]) -> SparseAutoencoder:
        """Train until `total_training_tokens` or until the batches run out; returns the SAE."""
        self._reuse_freed_memory()
        try:
            return self._fit(activation_batches)
        finally:
            # Hand the memory cached for the steps back to the OS (see cpu_memory).
            cpu_memory.restore_default_allocator()

    def _reuse_freed_memory(self) -> None:
        # Without this every CPU step page-faults its working set back in (see cpu_memory).
        wanted = self.cfg.cpu_reuse_freed_memory
        if wanted is None:
            wanted = self.sae.reuse_freed_cpu_memory
        if wanted and self.sae.device.type == "cpu":
            cpu_memory.reuse_freed_memory()

    def _fit(self, activation_batches: Iterable[torch.Tensor]) -> SparseAutoencoder:
        batches = iter(activation_batches)
        first = next(batches, None)
        if first is None:
            raise SAELensError("no activations to train on: the dataset produced no tokens")
        self._check_batch(first)
        self._initialise_from(first)
        total_steps = self.cfg.total_training_steps
        checkpoint_steps = self._checkpoint_steps(total_steps)
        progress = tqdm(total=total_steps, disable=not self.show_progress, desc="training", unit="step")
        started = time.perf_counter()
        n_logs = 0
        for x in self._limited(chain([first], batches), total_steps):
            step = self.n_steps + 1
            log_now = step % self.cfg.wandb_log_frequency == 0 or step == total_steps
            metrics = self.train_step(x, return_metrics=log_now)
            progress.update(1)
            if log_now:
                n_logs += 1
                metrics["tokens_per_second"] = self.n_tokens / (time.perf_counter() - started)
                if n_logs % self.cfg.eval_every_n_wandb_logs == 0:
                    metrics.update(self.evaluate())
                self._log(metrics)
                progress.set_postfix(
                    tok_s=f"{metrics['tokens_per_second']:.0f}",
                    L0=f"{metrics['l0']:.1f}",
                    EV=f"{metrics['explained_variance']:.3f}",
                )
            if self.n_steps % self.cfg.feature_sampling_window == 0:
                self._log_density_window()
            if self.n_steps in checkpoint_steps and self.checkpoint_dir is not None:
                self.save_checkpoint(self.checkpoint_dir / f"step_{self.n_steps}")
        progress.close()
        self.ran_out_of_data = self.n_steps < total_steps
        self.last_eval = self.evaluate()
        self._log({key: value for key, value in self.last_eval.items()})
        self.finalise()
        return self.sae

    def train_step(self, x: torch.Tensor, return_metrics: bool = True) -> dict[str, Any]:
        """One optimiser step on `x` `[batch, d_in]` (raw scale); the step's metrics if asked."""
        sae = self.sae
        if x.ndim != 2 or x.shape[1] != sae.cfg.d_in:
            self._check_batch(x)
        x = x.to(sae.device, sae.dtype)
        if self.input_scale != 1.0:  # no per-step copy of the batch when there is no scale
            x = x * self.input_scale
        dead_mask = self.steps_since_fired > self.cfg.dead_window_steps
        with torch.autocast(sae.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            output = sae.training_forward_pass(x, dead_mask, self.current_l1_coefficient())
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        if sae.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        self.scheduler.step()

        with torch.no_grad():
            fired_per_latent = latent_fire_counts(output.feature_acts)
            self.fire_counts += fired_per_latent
            self.window_fire_counts += fired_per_latent
            self.steps_since_fired += 1
            self.steps_since_fired[fired_per_latent > 0] = 0
        self.n_steps += 1
        self.n_tokens += x.shape[0]
        self.window_tokens += x.shape[0]
        if not return_metrics:
            return {}
        with torch.no_grad():
            return {
                "loss": output.loss.item(),
                "mse_loss": output.mse_loss.item(),
                "l1_loss": output.l1_loss.item(),
                "aux_loss": output.ghost_grad_loss.item(),
                "l0": fired_per_latent.sum().item() / x.shape[0],
                "explained_variance": explained_variance(x, output.sae_out),
                "dead_fraction": dead_mask.float().mean().item(),
                "lr": self.scheduler.get_last_lr()[0],
                "l1_coefficient": self.current_l1_coefficient(),
                "tokens": self.n_tokens,
            }

    def current_l1_coefficient(self) -> float:
        """The sparsity coefficient after linear warm-up over `l1_warm_up_steps`."""
        warm_up = self.cfg.l1_warm_up_steps
        ramp = min(1.0, (self.n_steps + 1) / warm_up) if warm_up > 0 else 1.0
        return self.cfg.l1_coefficient * ramp

    # -- initialisation -------------------------------------------------------------------------

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.sae.cfg.d_in:
            raise SAELensError(
                f"activation batches must be [batch, d_in={self.sae.cfg.d_in}]; got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialise_from(self, x: torch.Tensor) -> None:
        """Estimate the input scale and set b_dec, both from the first batch."""
        x = x.to(self.sae.device, torch.float32)
        if self.cfg.normalize_activations == "expected_average_only_in":
            # Scale so the average input norm is sqrt(d_in): hyperparameters then transfer
            # between models whose residual streams differ in size by orders of magnitude.
            self.input_scale = (self.sae.cfg.d_in**0.5) / x.norm(dim=-1).mean().item()
            self.sae.cfg.normalize_activations = "expected_average_only_in"
        x = x * self.input_scale
        method = self.cfg.b_dec_init_method
        if method == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(x[:4096]).to(self.sae.dtype))
        elif method == "mean":
            self.sae.b_dec.copy_(x.mean(dim=0).to(self.sae.dtype))

    # -- evaluation, logging, saving ------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Run the evaluator (if any) on the SAE in its current, training-scale form."""
        if self.evaluator is None:
            return {}
        self.sae.eval()
        try:
            return self.evaluator(self.sae, self.input_scale)
        finally:
            self.sae.train()

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.logger is None:
            return
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        self.logger.log(scalars, step=self.n_steps)
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                self.logger.log_histogram(name, value, step=self.n_steps)

    def _log_density_window(self) -> None:
        if self.logger is not None and self.window_tokens > 0:
            density = self.window_fire_counts / self.window_tokens
            self.logger.log_histogram("log10_feature_density", torch.log10(density + 1e-10), self.n_steps)
        self.window_fire_counts.zero_()
        self.window_tokens = 0

    def log10_feature_density(self) -> torch.Tensor:
        """log10 of each latent's firing rate over the whole run, `[d_sae]` (as in sparsity.safetensors)."""
        return torch.log10(self.fire_counts / max(1, self.n_tokens) + 1e-10).float()

    @torch.no_grad()
    def finalise(self) -> None:
        """Fold the input scale into the weights, so the SAE takes raw activations."""
        if self.input_scale != 1.0:
            self.sae.fold_activation_norm_scaling_factor(self.input_scale)
            self.input_scale = 1.0

    def save_checkpoint(self, path: Path) -> None:
        """Save the SAE (raw-scale weights) without disturbing the training-scale copy."""
        if self.input_scale == 1.0:
            self.sae.save_model(path, self.log10_feature_density())
            return
        state = {k: v.clone() for k, v in self.sae.state_dict().items()}
        normalize = self.sae.cfg.normalize_activations
        self.sae.fold_activation_norm_scaling_factor(self.input_scale)
        self.sae.save_model(path, self.log10_feature_density())
        self.sae.load_state_dict(state)
        self.sae.cfg.normalize_activations = normalize

    @staticmethod
    def _limited(batches: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
        for step, batch in enumerate(batches):
            if step >= n:
                return
            yield batch

    def _checkpoint_steps(self, total_steps: int) -> set[int]:
        n = self.cfg.n_checkpoints
        return {round(total_steps * (i + 1) / (n + 1)) for i in range(n)} if n else set()
