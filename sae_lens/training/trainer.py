"""The one training loop. Every architecture trains here; they differ only in their encode, decode and
auxiliary losses.

One step: scale the batch -> forward with losses -> backward -> drop the decoder-parallel gradient
-> Adam -> renormalise the decoder -> LR schedule -> update the dead-latent counters -> log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens import cpu_memory, distributed
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance
from sae_lens.geometric_median import geometric_median
from sae_lens.metrics_logger import MetricsLogger
from sae_lens.saes.sae import SparseAutoencoder, latent_fire_counts
from sae_lens.training.checkpoint import write_checkpoint
from sae_lens.training.config import TrainerConfig
from sae_lens.training.decoder_refit import DecoderRefit, apply_refit
from sae_lens.training.health import training_warnings
from sae_lens.training.state import TrainingState
from sae_lens.training.stopping import GracefulStop, TrainingDiverged, TrainingInterrupted

log = logging.getLogger("sae_lens")

Evaluator = Callable[[SparseAutoencoder, float], dict[str, Any]]
"""Called as `evaluator(sae, input_scale)`; returns metrics to log (tensors are logged as histograms)."""


class SAETrainer:
    """Trains `sae` on any iterable of `[batch, d_in]` activation tensors.

    `cfg` is a `TrainerConfig` (a `LanguageModelSAERunnerConfig` is one). `evaluator`, when given,
    runs every `eval_every_n_wandb_logs` logs and at the end; `logger` receives every metric;
    `checkpoint_dir` receives `n_checkpoints` evenly spaced checkpoints. All state that training
    carries from step to step is in `self.state` (a `TrainingState`). After `fit`, the SAE takes raw
    activations (an input scale used in training is folded in).
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        sae: SparseAutoencoder,
        *,
        evaluator: Evaluator | None = None,
        logger: MetricsLogger | None = None,
        checkpoint_dir: str | Path | None = None,
        show_progress: bool = True,
        checkpoint_extra: Callable[[], dict[str, Any]] | None = None,
        name: str = "sae",
        data_parallel: bool = True,
    ) -> None:
        self.cfg = cfg
        self.name = name
        """The SAE's name in checkpoints and progress bars (a runner uses the run name)."""
        self.data_parallel = data_parallel and distributed.is_distributed()
        """Under torchrun: average gradients and statistics across ranks (each rank has its own data).
        False when this rank alone trains this SAE on gathered batches (`distribute_saes`)."""
        self.sae = sae
        self.state = TrainingState(cfg, sae)
        self.evaluator = evaluator
        self.logger = logger
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.show_progress = show_progress
        self.checkpoint_extra = checkpoint_extra
        """Called when a checkpoint is written; what it returns is saved too (the store's position)."""
        self.last_eval: dict[str, Any] = {}
        self.logged_losses: list[float] = []
        """The training loss at every log of this process's run (what `warnings` reads)."""
        self.ran_out_of_data = False
        self._graceful_stop = GracefulStop()
        self.refit_report: dict[str, float] = {}
        """What the decoder refit did (`tokens`, `objective_before`, `objective_after`); empty if nothing."""
        self._refit_from_step = self._decoder_refit_start()
        self._before_refit: dict[str, torch.Tensor] | None = None

    # Seed-era attribute names, read from the state.
    optimizer = property(lambda self: self.state.optimizer)
    scheduler = property(lambda self: self.state.scheduler)
    n_steps = property(lambda self: self.state.n_steps)
    n_tokens = property(lambda self: self.state.n_tokens)
    input_scale = property(lambda self: self.state.input_scale)
    steps_since_fired = property(lambda self: self.state.steps_since_fired)
    fire_counts = property(lambda self: self.state.fire_counts)

    # -- the loop -------------------------------------------------------------------------------

    def allocator_policy(self) -> contextlib.AbstractContextManager[bool]:
        """The CPU allocator setting for this SAE's training (see `sae_lens.cpu_memory`): the one
        place it is decided. `fit` holds it; wrap direct `train_step` calls in it too."""
        wanted = self.cfg.cpu_reuse_freed_memory
        if wanted is None:
            wanted = self.sae.reuse_freed_cpu_memory
        return cpu_memory.reusing_freed_memory(bool(wanted) and self.sae.device.type == "cpu")

    def fit(self, activation_batches: Iterable[torch.Tensor]) -> SparseAutoencoder:
        """Train until `total_training_tokens` or until the batches run out; returns the SAE."""
        with self.session():
            return self._fit(activation_batches)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """What a training loop runs inside: the allocator policy and the graceful stop on SIGINT /
        SIGTERM. `fit` uses it; so does a runner that drives `begin` / `step` / `end` itself."""
        with self.allocator_policy(), self._graceful_stop:
            yield

    def _fit(self, activation_batches: Iterable[torch.Tensor]) -> SparseAutoencoder:
        batches = iter(activation_batches)
        first = next(batches, None)
        if first is None:
            raise SAELensError("no activations to train on: the dataset produced no tokens")
        self.begin(first)
        for x in self._limited(chain([first], batches), self.cfg.total_training_steps - self.n_steps):
            self.step(x)
            if self._graceful_stop.requested is not None:
                self._stop(self._graceful_stop.requested)
        return self.end()

    # The loop in three parts, so that a runner can drive several trainers from one batch stream.

    def begin(self, first_batch: torch.Tensor, first_target: torch.Tensor | None = None) -> None:
        """Check the first batch, set b_dec and the input scale from it (once per run), start the clock.

        For a transcoder b_dec lives in the output space, so it starts from `first_target`."""
        self._check_batch(first_batch)
        self._initialise_from(first_batch, first_target)
        total_steps = self.cfg.total_training_steps
        self._checkpoint_steps_set = self._checkpoint_steps(total_steps)
        self._progress = tqdm(
            total=total_steps,
            initial=self.n_steps,
            disable=not self.show_progress,
            desc="training",
            unit="step",
        )
        self._started = time.perf_counter()
        self._tokens_at_start = self.n_tokens

    @property
    def done(self) -> bool:
        """Whether `total_training_tokens` have been trained."""
        return self.n_steps >= self.cfg.total_training_steps

    def step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, Any]:
        """One step with its logging, evaluation, density window and checkpoint."""
        step = self.n_steps + 1
        frequency = self.cfg.wandb_log_frequency
        log_now = step % frequency == 0 or step == self.cfg.total_training_steps
        metrics = self.train_step(x, return_metrics=log_now, target=target)
        self._progress.update(1)
        if log_now:
            elapsed = time.perf_counter() - self._started
            metrics["tokens_per_second"] = (self.n_tokens - self._tokens_at_start) / max(elapsed, 1e-9)
            # Counted from the step number, so a resumed run evaluates at the same steps.
            if step % frequency == 0 and (step // frequency) % self.cfg.eval_every_n_wandb_logs == 0:
                metrics.update(self.evaluate())
            self._log(metrics)
            self._progress.set_postfix(
                tok_s=f"{metrics['tokens_per_second']:.0f}",
                L0=f"{metrics['l0']:.1f}",
                EV=f"{metrics['explained_variance']:.3f}",
            )
        if self.n_steps % self.cfg.feature_sampling_window == 0:
            self._close_density_window()
        if self.n_steps in self._checkpoint_steps_set and self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir / f"step_{self.n_steps}")
        return metrics

    def end(self) -> SparseAutoencoder:
        """The decoder refit, the final evaluation, then fold the input scale in; returns the SAE."""
        self._progress.close()
        self.ran_out_of_data = self.n_steps < self.cfg.total_training_steps
        self.last_eval = self._refit_and_evaluate()
        self._log(dict(self.last_eval))
        self.finalise()
        return self.sae

    def warnings(self) -> list[str]:
        """What the end-of-training check finds wrong with the trained SAE (`sae_lens.training.health`)."""
        metrics = {key.removeprefix("eval/"): value for key, value in self.last_eval.items()}
        # Dead by the training rule (no firing for `dead_window_steps` of training): the held-out rows
        # are too few tokens to tell a dead latent from a rare one.
        metrics["dead_fraction"] = self.dead_latents().float().mean().item()
        # The first step's loss leads: a far too high lr blows the loss up before the first log.
        losses = [self.state.first_loss, *self.logged_losses]
        return training_warnings(
            metrics, losses, self.sae.cfg.architecture, transcoder=self.sae.cfg.d_out is not None
        )

    def _stop(self, signal_number: int) -> None:
        """Checkpoint (when there is a folder for it), fold the input scale, and raise."""
        self._progress.close()
        checkpoint = None
        if self.checkpoint_dir is not None:
            checkpoint = self.checkpoint_dir / f"step_{self.n_steps}"
            if not (checkpoint / "checkpoint.json").is_file():
                self.save_checkpoint(checkpoint)
        self.finalise()
        raise TrainingInterrupted(signal_number, self.n_steps, checkpoint)

    def dead_latents(self) -> torch.Tensor:
        """`[d_sae]` bool: latents that count as dead now (the window rule, then the threshold rule)."""
        dead = self.state.steps_since_fired > self.cfg.dead_window_steps
        return dead | self.state.below_threshold if self.cfg.dead_feature_threshold > 0 else dead

    def train_step(
        self, x: torch.Tensor, return_metrics: bool = True, target: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """One optimiser step on `x` `[batch, d_in]` (raw scale); the step's metrics if asked.

        `target` `[batch, d_out]`: what a transcoder should output (an SAE reconstructs `x`).
        """
        sae, state = self.sae, self.state
        if x.ndim != 2 or x.shape[1] != sae.cfg.d_in:
            self._check_batch(x)
        given = x
        x = x.to(sae.device, sae.dtype)
        if target is not None:
            target = target.to(sae.device, sae.dtype)
        if state.input_scale != 1.0:  # no per-step copy of the batch when there is no scale
            x = x * state.input_scale
        dead_mask = self.dead_latents()
        with torch.autocast(sae.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            output = sae.training_forward_pass(x, dead_mask, self.current_l1_coefficient(), target)
        self._check_loss(output.loss)
        state.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if self.data_parallel:
            distributed.average_gradients(sae)
        if sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        if self.cfg.max_grad_norm is not None:
            # foreach: one fused pass over the gradients; the few outlier batches of a run otherwise
            # throw Adam's moments off for many steps.
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.max_grad_norm, foreach=True)
        state.optimizer.step()
        if sae.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        state.scheduler.step()

        with torch.no_grad():
            fired_per_latent = latent_fire_counts(output.feature_acts)
            n_tokens = x.shape[0]
            if self.data_parallel:
                distributed.average_buffers(sae)
                distributed.sum_(fired_per_latent)
                n_tokens *= distributed.world_size()
            state.fire_counts += fired_per_latent
            state.window_fire_counts += fired_per_latent
            state.steps_since_fired += 1
            state.steps_since_fired[fired_per_latent > 0] = 0
            if self._refit_from_step is not None and state.n_steps >= self._refit_from_step:
                # A copy only of the caller's own tensor (which it may reuse); a moved, cast or
                # scaled batch is already this step's.
                state.refit_inputs.append(x.detach().clone() if x is given else x.detach())
                if target is not None:
                    state.refit_targets.append(target.detach().clone())
        state.n_steps += 1
        state.n_tokens += n_tokens
        state.window_tokens += n_tokens
        if not return_metrics:
            return {}
        with torch.no_grad():
            return {
                "loss": output.loss.item(),
                "mse_loss": output.mse_loss.item(),
                "l1_loss": output.l1_loss.item(),
                "aux_loss": output.ghost_grad_loss.item(),
                **{f"losses/{name}": value.item() for name, value in output.losses.items()},
                "l0": fired_per_latent.sum().item() / n_tokens,
                "explained_variance": explained_variance(x if target is None else target, output.sae_out),
                "dead_fraction": dead_mask.float().mean().item(),
                "lr": state.scheduler.get_last_lr()[0],
                "l1_coefficient": self.current_l1_coefficient() or 0.0,
                "tokens": state.n_tokens,
            }

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Stop before the optimiser step when the loss is not finite or has exploded."""
        value = loss.item()
        if self.data_parallel:
            value = distributed.max_of(value)  # every rank must take the same decision
        state = self.state
        if math.isnan(state.first_loss):
            state.first_loss = value
        limit = self.cfg.divergence_factor * abs(state.first_loss)
        if math.isfinite(value) and (value <= limit or not math.isfinite(limit)):
            return
        step = state.n_steps + 1
        what = (
            f"loss {value:.4g}"
            if not math.isfinite(value)
            else (
                f"loss {value:.4g}, over {self.cfg.divergence_factor:g}x its first-step value {state.first_loss:.4g}"
            )
        )
        lr = state.scheduler.get_last_lr()[0]
        raise TrainingDiverged(
            f"training diverged at step {step}: {what} (lr {lr:g}); the learning rate is the likely cause: "
            "lower lr (e.g. by 10x) or add lr_warm_up_steps; nothing was saved over earlier checkpoints"
        )

    def current_l1_coefficient(self) -> float | None:
        """The sparsity coefficient after linear warm-up over `l1_warm_up_steps` (None: no penalty)."""
        coefficient = self.sae.sparsity_coefficient
        if coefficient is None:
            return None
        warm_up = self.cfg.l1_warm_up_steps
        ramp = min(1.0, (self.n_steps + 1) / warm_up) if warm_up > 0 else 1.0
        return coefficient * ramp

    # -- the decoder refit (sae_lens.training.decoder_refit) -------------------------------------

    def _decoder_refit_start(self) -> int | None:
        """The first step whose batch feeds the refit, or None when there is no refit."""
        sae, steps = self.sae, self.cfg.refit_steps
        if steps <= 0 or not sae.supports_decoder_refit or sae.cfg.skip_connection:
            return None
        if sae.cfg.d_sae > self.cfg.decoder_refit_max_latents:
            log.info(
                "decoder refit skipped: d_sae %d is over decoder_refit_max_latents (%d); its Gram matrix "
                "would take %.1f GB (raise decoder_refit_max_latents to refit anyway)",
                sae.cfg.d_sae,
                self.cfg.decoder_refit_max_latents,
                DecoderRefit.memory_bytes(sae.cfg.d_sae) / 1e9,
            )
            return None
        return max(0, self.cfg.total_training_steps - steps)

    @torch.no_grad()
    def refit_decoder(self) -> dict[str, float]:
        """Encode the kept final batches with the trained SAE and replace `W_dec` and `b_dec` by
        the least-squares fit to them (once; the encoder bias absorbs the change of b_dec when the
        encoder subtracts it). Returns `refit_report`; `{}` when nothing was kept or the fit would
        not lower their squared error."""
        state, sae = self.state, self.sae
        inputs = state.refit_inputs
        targets: list[torch.Tensor | None] = list(state.refit_targets) or [None] * len(inputs)
        state.refit_inputs, state.refit_targets = [], []
        if not inputs:
            return self.refit_report
        started = time.perf_counter()
        refit = DecoderRefit(sae.cfg.d_sae, sae.cfg.output_width, sae.device)
        # The inference codes (BatchTopK's are its threshold's), without touching any training
        # statistic such as that threshold.
        was_training = sae.training
        sae.eval()
        for x, target in zip(inputs, targets, strict=True):
            refit.add(sae.encode(x), x if target is None else target)
        sae.train(was_training)
        del inputs, targets
        tokens = float(refit.upper[-1, -1])
        solved = refit.solve(
            sae.W_dec, sae.b_dec, ridge=self.cfg.decoder_refit_ridge, data_parallel=self.data_parallel
        )
        del refit
        if solved is None:
            return self.refit_report
        weights, before, after = solved
        self._before_refit = {
            name: getattr(sae, name).detach().clone() for name in ("W_dec", "b_dec", "b_enc")
        }
        apply_refit(sae, weights)
        seconds = time.perf_counter() - started
        self.refit_report = {
            "tokens": tokens,
            "objective_before": before,
            "objective_after": after,
            "seconds": seconds,
        }
        log.info(
            "decoder refit on %d tokens in %.1f s: their squared error %.4g -> %.4g (%.1f%% lower)",
            tokens,
            seconds,
            before,
            after,
            100 * (1 - after / before),
        )
        return self.refit_report

    @torch.no_grad()
    def _refit_and_evaluate(self) -> dict[str, Any]:
        """The refit, then the final evaluation. The kept batches are training data, so with an
        evaluator the refit must also not lower the held-out explained variance, or it is undone."""
        before = self.evaluate() if self.state.refit_inputs and self.evaluator is not None else None
        self.refit_decoder()
        after = self.evaluate()
        saved = self._before_refit
        undone = (
            saved is not None
            and before is not None
            and after.get("eval/explained_variance", 0.0) < before.get("eval/explained_variance", 0.0)
        )
        if self.data_parallel:
            undone = distributed.any_rank(undone)  # every rank keeps the same weights
        if undone and saved is not None:  # under torchrun, on the ranks without an evaluator too
            for name, tensor in saved.items():
                getattr(self.sae, name).copy_(tensor)
            log.info("decoder refit undone: it lowered the held-out explained variance")
            self.refit_report = {}
            after = before if before is not None else after
        if self.refit_report and before is not None and "eval/explained_variance" in after:
            self.refit_report["held_out_explained_variance_before"] = before["eval/explained_variance"]
            self.refit_report["held_out_explained_variance"] = after["eval/explained_variance"]
        self._before_refit = None
        return after

    # -- initialisation -------------------------------------------------------------------------

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.sae.cfg.d_in:
            raise SAELensError(
                f"activation batches must be [batch, d_in={self.sae.cfg.d_in}]; got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialise_from(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Estimate the input scale and set b_dec, both from the first batch (once per run)."""
        if self.state.initialised:
            return
        x = x.to(self.sae.device, torch.float32)
        if self.data_parallel:
            x = distributed.gather_rows(x)  # every rank initialises from the same global batch
        if self.cfg.normalize_activations == "expected_average_only_in":
            # Scale so the average input norm is sqrt(d_in): hyperparameters then transfer
            # between models whose residual streams differ in size by orders of magnitude.
            self.state.input_scale = (self.sae.cfg.d_in**0.5) / x.norm(dim=-1).mean().item()
        outputs = x * self.state.input_scale
        if target is not None:
            outputs = target.to(self.sae.device, torch.float32)
            if self.data_parallel:
                outputs = distributed.gather_rows(outputs)
        method = self.cfg.b_dec_init_method
        if method == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(outputs[:4096]).to(self.sae.dtype))
        elif method == "mean":
            self.sae.b_dec.copy_(outputs.mean(dim=0).to(self.sae.dtype))
        self.state.initialised = True

    # -- evaluation, logging, saving ------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Run the evaluator (if any) on the SAE in its current, training-scale form."""
        if self.evaluator is None:
            return {}
        self.sae.eval()
        try:
            return self.evaluator(self.sae, self.state.input_scale)
        finally:
            self.sae.train()

    def _log(self, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            self.logged_losses.append(float(metrics["loss"]))
        if self.logger is None:
            return
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        self.logger.log(scalars, step=self.n_steps)
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                self.logger.log_histogram(name, value, step=self.n_steps)

    def _close_density_window(self) -> None:
        """Log the window's feature densities and mark the latents below `dead_feature_threshold`."""
        state = self.state
        if state.window_tokens > 0:
            density = state.window_fire_counts / state.window_tokens
            state.below_threshold = density < self.cfg.dead_feature_threshold
            if self.logger is not None:
                self.logger.log_histogram("log10_feature_density", torch.log10(density + 1e-10), self.n_steps)
        state.window_fire_counts.zero_()
        state.window_tokens = 0

    def write_sae_folder(self, folder: Path) -> Path:
        """Save the SAE with raw-scale weights (folded into a copy; training continues unchanged)."""
        return self.sae.save_model(folder, self.log10_feature_density(), input_scale=self.state.input_scale)

    def sae_folder_contents(self) -> dict[str, bytes]:
        """The files `write_sae_folder` writes, as bytes: how a rank hands its SAE to the rank that saves."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.write_sae_folder(Path(tmp))
            return {file.name: file.read_bytes() for file in sorted(folder.iterdir())}

    def log10_feature_density(self) -> torch.Tensor:
        """log10 of each latent's firing rate over the whole run, `[d_sae]` (as in sparsity.safetensors)."""
        return torch.log10(self.state.fire_counts / max(1, self.n_tokens) + 1e-10).float()

    @torch.no_grad()
    def finalise(self) -> None:
        """Fold the input scale into the weights, so the SAE takes raw activations."""
        if self.state.input_scale != 1.0:
            self.sae.fold_activation_norm_scaling_factor(self.state.input_scale)
            self.state.input_scale = 1.0

    def save_checkpoint(self, path: Path) -> Path:
        """Write a resumable checkpoint folder (see `sae_lens.training.checkpoint`): the SAE with
        raw-scale weights (folded into a copy; training continues unchanged) and the whole training
        state. Keeps only the last `keep_last_n_checkpoints` when set."""

        extra = self.checkpoint_extra() if self.checkpoint_extra is not None else {}
        write_checkpoint(
            path,
            sae_writers={self.name: self.write_sae_folder},
            training_states={self.name: self.state.state_dict()},
            step=self.n_steps,
            tokens=self.n_tokens,
            extra=extra,
        )
        self._prune_checkpoints(path.parent)
        return path

    def _prune_checkpoints(self, folder: Path) -> None:
        keep = self.cfg.keep_last_n_checkpoints
        if keep is None:
            return
        import shutil

        while (oldest := self._oldest_beyond(folder, keep)) is not None:
            shutil.rmtree(oldest)

    @staticmethod
    def _oldest_beyond(folder: Path, keep: int) -> Path | None:
        steps = sorted(
            int(child.name.removeprefix("step_"))
            for child in folder.glob("step_*")
            if child.name.removeprefix("step_").isdigit() and (child / "checkpoint.json").is_file()
        )
        return folder / f"step_{steps[0]}" if len(steps) > keep else None

    @staticmethod
    def _limited(batches: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
        for step, batch in enumerate(batches):
            if step >= n:
                return
            yield batch

    def _checkpoint_steps(self, total_steps: int) -> set[int]:
        n = self.cfg.n_checkpoints
        return {round(total_steps * (i + 1) / (n + 1)) for i in range(n)} if n else set()
