"""Training experiments that the configuration does not offer, for `bench_quality.py --variant`.

A variant name is a comma-separated list of `key=value` changes to our trainer (docs/quality.md
has the rows they produced):

- `enc_scale=S`: multiply the initial encoder (the decoder's transpose) by S;
- `enc_lr=M`, `benc_lr=M`, `bdec_lr=M`: train `W_enc` (`b_enc`, `b_dec`) at M times the learning
  rate;
- `refit=F`: after training, replace `W_dec` and `b_dec` by the least-squares fit of the batches
  to the trained encoder's codes, over the last fraction F of the training batches (the
  experiment behind `decoder_refit_tokens`; pass `--ours-config decoder_refit_tokens=0` with it);
- `retie=N`: every N steps until 80% of the run, give each latent that has not fired for N steps
  its decoder row (at the median live encoder norm) as its encoder column, the median live b_enc,
  and fresh Adam moments for both;
- `lazy_adam=1`: leave a latent's weights and Adam moments alone in a step that gave it no gradient;
- `aux_nobias=1`: AuxK does not train the dead latents' encoder bias;
- `aux_rotate=1`: AuxK only turns the dead latents' encoder columns (no radial gradient);
- `k_anneal=F`: k falls linearly from 4k to k over the first fraction F of the steps;
- `dead_decay=T`: start the final linear decay early, at the first step after `dead_grace`
  (default 20) where more than a share T of the latents have not fired for the dead-latent window
  (the decay otherwise starts where `lr_decay_steps` puts it);
- `norm_to=F`: scale the inputs (`input_scale`, folded in at the end) so that their mean norm
  is F sqrt(d_in), as `normalize_activations` does with F = 1;
- `fit_scale=1`: at the first batch, scale the encoder by the least-squares size of the initial
  reconstruction (codes are linear in the encoder's scale while the biases are zero), at most 1;
- `dead_dec=T`: the first time, after `dead_grace` steps, that more than a share T of the latents
  have not fired for the dead-latent window, multiply the decoder's lr by `dead_dec_factor`
  (default 0.5) for the rest of the run;
- `resample=N`: every N steps until `resample_until` of the run (default 0.5), give each latent
  that has not fired for the dead-latent window a new direction: the residual of a token of the
  batch drawn with probability proportional to its squared error, as its decoder row and (times
  `resample_norm`, default 1, of the median live encoder norm) its encoder column, the median
  live b_enc, and fresh Adam moments (Anthropic's 2023 resampling, adapted to TopK);
- `diag=N`: no change; every N steps record, on 512 tokens of the batch, the median k-th largest
  pre-activation, the median best pre-activation of the silent and of the live latents, how far
  `b_dec` has moved, and the encoder/decoder cosine of each group (`info["diag"]`);
- `trace=1`: no change (the trace alone).

Every variant also records, every 25 steps (`trace`), how many latents had not fired for 10 and 50
steps, and the median encoder norm and bias of the silent and the live ones.

    python benchmarks/bench_quality.py --libs ours --layers 3 --archs topk32 --lrs 1e-3 \\
        --variants-file benchmarks/quality_variants.py --variant enc_scale=0.1
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def train_variant(name: str, cfg_kwargs: dict[str, Any], batches: Iterable[torch.Tensor]) -> tuple[Any, dict]:
    """Train our SAE from `cfg_kwargs` with the changes `name` lists; returns it and what was recorded."""
    from sae_lens import LanguageModelSAERunnerConfig, SAETrainer, SparseAutoencoder

    changes = dict(part.split("=", 1) for part in name.split(",") if part)
    unknown = set(changes) - {
        "trace",
        "k_anneal",
        "aux_nobias",
        "aux_rotate",
        "lazy_adam",
        "enc_scale",
        "enc_lr",
        "benc_lr",
        "retie",
        "refit",
        "dead_decay",
        "dead_grace",
        "diag",
        "bdec_lr",
        "fit_scale",
        "norm_to",
        "dead_dec",
        "dead_dec_factor",
        "resample",
        "resample_until",
        "resample_norm",
    }
    if unknown:
        raise ValueError(f"unknown variant keys {sorted(unknown)}")
    if "aux_nobias" in changes or "aux_rotate" in changes:
        _aux_k_patched(bias="aux_nobias" in changes, radial="aux_rotate" in changes)
    cfg = LanguageModelSAERunnerConfig(**cfg_kwargs)
    sae = SparseAutoencoder(cfg)
    trainer = SAETrainer(cfg, sae, show_progress=False)
    if "enc_scale" in changes:
        with torch.no_grad():
            sae.W_enc.mul_(float(changes["enc_scale"]))
    for key, name in (("enc_lr", "W_enc"), ("benc_lr", "b_enc"), ("bdec_lr", "b_dec")):
        if key in changes:
            # Adam keeps one group per parameter list; the parameter is in the first (base-lr)
            # group, so move it to its own.
            param = getattr(sae, name)
            state = trainer.state
            base = state.optimizer.param_groups[0]
            base["params"] = [p for p in base["params"] if p is not param]
            state.optimizer.add_param_group({"params": [param], "lr": state.lr * float(changes[key])})
            state.scheduler = torch.optim.lr_scheduler.LambdaLR(
                state.optimizer, state.scheduler.lr_lambdas[0]
            )
    if "lazy_adam" in changes:
        _lazy_adam(trainer)
    stream: Iterable[torch.Tensor] = batches
    kept: list[torch.Tensor] = []
    if "refit" in changes:
        kept = list(batches)
        stream = iter(kept)
    retied: list[tuple[int, int]] = []
    if "retie" in changes:
        every = int(changes["retie"])
        stream = _retying(trainer, stream, every, int(0.8 * cfg.total_training_steps), retied)
    if "k_anneal" in changes:
        stream = _annealing_k(trainer, stream, float(changes["k_anneal"]), cfg.total_training_steps)
    decay_started: list[int] = []
    if "dead_decay" in changes:
        stream = _dead_decaying(
            trainer, stream, float(changes["dead_decay"]), int(changes.get("dead_grace", 20)), decay_started
        )
    if "norm_to" in changes:
        stream = _normalising(trainer, stream, float(changes["norm_to"]))
    scales: list[float] = []
    if "fit_scale" in changes:
        stream = _fitting_scale(trainer, stream, scales)
    diag: list[dict[str, float]] = []
    if "diag" in changes:
        stream = _diagnosing(trainer, stream, int(changes["diag"]), diag)
    decoder_slowed: list[int] = []
    if "dead_dec" in changes:
        stream = _dead_slowing_decoder(
            trainer,
            stream,
            float(changes["dead_dec"]),
            float(changes.get("dead_dec_factor", 0.5)),
            int(changes.get("dead_grace", 20)),
            decoder_slowed,
        )
    resampled: list[tuple[int, int]] = []
    if "resample" in changes:
        stream = _resampling(
            trainer,
            stream,
            int(changes["resample"]),
            int(float(changes.get("resample_until", 0.5)) * cfg.total_training_steps),
            float(changes.get("resample_norm", 1.0)),
            resampled,
        )
    trace: list[dict[str, int]] = []
    trainer.fit(_tracing(trainer, stream, trace))
    info: dict[str, Any] = {
        "lr_used": trainer.state.lr,
        "trace": trace,
        "retied": retied,
        "decay_started": decay_started,
        "diag": diag,
        "fitted_scale": scales,
        "decoder_slowed": decoder_slowed,
        "resampled": resampled,
    }
    if kept:
        share = float(changes["refit"])
        info["refit_seconds"] = _refit_decoder(sae, kept[-max(1, round(share * len(kept))) :])
    return sae, info


def _lazy_adam(trainer: Any) -> None:
    """Adam that leaves a latent's weights and moments alone in a step that gave it no gradient
    (its momentum otherwise keeps moving a latent that has stopped firing)."""
    sae, optimizer = trainer.sae, trainer.state.optimizer
    step = optimizer.step
    # (parameter, latent dimension)
    per_latent = [(sae.W_enc, 1), (sae.b_enc, 0), (sae.W_dec, 0)]

    def lazy_step(*args: Any, **kwargs: Any) -> Any:
        saved = []
        with torch.no_grad():
            grad = sae.W_enc.grad
            if grad is None:
                return step(*args, **kwargs)
            idle = (grad != 0).sum(dim=0) == 0
            index = idle.nonzero().squeeze(1)
            for param, dim in per_latent:
                moments = optimizer.state.get(param, {})
                saved.append(
                    (
                        param,
                        dim,
                        param.detach().index_select(dim, index).clone(),
                        {k: v.index_select(dim, index).clone() for k, v in moments.items() if k != "step"},
                    )
                )
        out = step(*args, **kwargs)
        with torch.no_grad():
            for param, dim, values, moments in saved:
                param.index_copy_(dim, index, values)
                for key, value in moments.items():
                    optimizer.state[param][key].index_copy_(dim, index, value)
        return out

    optimizer.step = lazy_step


def _aux_k_patched(bias: bool, radial: bool) -> None:
    """AuxK with the dead latents' encoder bias held fixed (`bias`) and/or without the radial part
    of its gradient on their encoder columns (`radial`: AuxK turns them, never shrinks them)."""
    import sae_lens.saes.aux_k as aux_module
    import sae_lens.saes.topk_sae as topk_module
    from sae_lens.saes.sae import TrainingBatch

    original = aux_module.aux_k_loss

    def patched(sae: Any, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        shadows = {}
        if bias:
            shadows["b_enc"] = sae.b_enc.detach()
        if radial:
            w = sae.W_enc
            norms = w.norm(dim=0, keepdim=True)
            shadows["W_enc"] = w / norms.clamp_min(1e-12) * norms.detach()
        try:
            sae.__dict__.update(shadows)  # shadows the parameters for this call only
            return original(sae, batch)
        finally:
            for name in shadows:
                del sae.__dict__[name]

    topk_module.aux_k_loss = patched


@torch.no_grad()
def _refit_decoder(sae: Any, batches: list[torch.Tensor], ridge: float = 1e-2) -> float:
    """The library's least-squares refit (`sae_lens.training.decoder_refit`) on `batches` (raw
    scale), after training, with the trained encoder's codes; returns its seconds."""
    import time

    from sae_lens.training.decoder_refit import DecoderRefit, apply_refit

    started = time.perf_counter()
    sae.eval()
    refit = DecoderRefit(sae.cfg.d_sae, sae.cfg.d_in, sae.device)
    for x in batches:
        refit.add(sae.encode(x), x)
    solved = refit.solve(sae.W_dec, sae.b_dec, ridge=ridge)
    if solved is not None:
        apply_refit(sae, solved[0])
    return time.perf_counter() - started


def _annealing_k(
    trainer: Any, batches: Iterable[torch.Tensor], share: float, total: int
) -> Iterator[torch.Tensor]:
    """k falls linearly from 4k to k over the first `share` of the steps."""
    k = trainer.sae.cfg.k
    until = max(1, round(share * total))
    for step, batch in enumerate(batches):
        trainer.sae.cfg.k = max(k, round(4 * k - 3 * k * min(1.0, step / until)))
        yield batch
    trainer.sae.cfg.k = k


def _dead_decaying(
    trainer: Any, batches: Iterable[torch.Tensor], share: float, grace: int, log: list[int]
) -> Iterator[torch.Tensor]:
    state, cfg = trainer.state, trainer.cfg
    total = cfg.total_training_steps
    start = [total - cfg.decay_steps_for(state.lr, trainer.sae.cfg.d_sae)]

    def multiplier(step: int) -> float:
        return 1.0 if step < start[0] else (total - step) / (total - start[0] + 1)

    state.scheduler.lr_lambdas = [multiplier] * len(state.optimizer.param_groups)
    for step, batch in enumerate(batches):
        if grace <= step < start[0]:
            dead = float((state.steps_since_fired > cfg.dead_window_steps).float().mean())
            if dead > share:
                start[0] = step
                log.append(step)
        yield batch


def _normalising(trainer: Any, batches: Iterable[torch.Tensor], share: float) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if step == 0:
            x = batch.float()
            trainer.state.input_scale = share * x.shape[1] ** 0.5 / x.norm(dim=-1).mean().item()
            trainer._initialise_from(batch)
        yield batch


def _fitting_scale(trainer: Any, batches: Iterable[torch.Tensor], log: list[float]) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if step == 0:
            log.append(_fit_encoder_scale(trainer, batch))
        yield batch


@torch.no_grad()
def _fit_encoder_scale(trainer: Any, batch: torch.Tensor) -> float:
    sae = trainer.sae
    trainer._initialise_from(batch)
    x = batch.to(sae.device, torch.float32) * trainer.state.input_scale
    written = sae.decode(sae.encode(x)) - sae.b_dec
    scale = float(((x - sae.b_dec) * written).sum() / written.pow(2).sum().clamp_min(1e-12))
    scale = min(1.0, max(scale, 1e-3))
    sae.W_enc.mul_(scale)
    return scale


@torch.no_grad()
def _diagnosing(
    trainer: Any, batches: Iterable[torch.Tensor], every: int, log: list[dict[str, float]]
) -> Iterator[torch.Tensor]:
    sae, state = trainer.sae, trainer.state
    b_dec0 = None
    for step, batch in enumerate(batches):
        if step % every == 0 and step > 0 and state.input_scale:
            if b_dec0 is None:
                b_dec0 = sae.b_dec.detach().clone()
            x = batch[:512] * state.input_scale
            pre = sae.encode_pre(x)
            kth = pre.topk(sae.cfg.k, dim=-1).values[:, -1]
            silent = state.steps_since_fired > 10
            best = pre.max(dim=0).values
            cos = torch.nn.functional.cosine_similarity(sae.W_enc.T, sae.W_dec, dim=-1)
            mean_dir = x.mean(0) / x.mean(0).norm()
            along = (sae.W_enc.T @ mean_dir) / sae.W_enc.norm(dim=0)
            row = {
                "step": step,
                "silent": int(silent.sum()),
                "kth_median": float(kth.median()),
                "best_silent": float(best[silent].median()) if silent.any() else 0.0,
                "best_live": float(best[~silent].median()),
                "bdec_moved": float((sae.b_dec - b_dec0).norm()),
                "bdec_norm": float(sae.b_dec.norm()),
                "x_norm": float(x.norm(dim=-1).mean()),
                "cos_live": float(cos[~silent].median()),
                "cos_silent": float(cos[silent].median()) if silent.any() else 0.0,
                "mean_dir_live": float(along[~silent].median()),
                "mean_dir_silent": float(along[silent].median()) if silent.any() else 0.0,
                "lr": float(state.optimizer.param_groups[0]["lr"]),
            }
            log.append(row)
        yield batch


def _dead_slowing_decoder(
    trainer: Any, batches: Iterable[torch.Tensor], share: float, factor: float, grace: int, log: list[int]
) -> Iterator[torch.Tensor]:
    state, cfg = trainer.state, trainer.cfg
    for step, batch in enumerate(batches):
        if step >= grace and not log:
            dead = float((state.steps_since_fired > cfg.dead_window_steps).float().mean())
            if dead > share:
                # The decoder's group is the second (`TrainingState`); LambdaLR rescales base_lrs.
                state.scheduler.base_lrs[1] *= factor
                state.optimizer.param_groups[1]["lr"] *= factor
                log.append(step)
        yield batch


def _resampling(
    trainer: Any,
    batches: Iterable[torch.Tensor],
    every: int,
    until: int,
    norm_share: float,
    log: list[tuple[int, int]],
) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if step and step % every == 0 and step < until:
            log.append((step, _resample(trainer, batch, norm_share)))
        yield batch


@torch.no_grad()
def _resample(trainer: Any, batch: torch.Tensor, norm_share: float) -> int:
    state, sae, cfg = trainer.state, trainer.sae, trainer.cfg
    dead = state.steps_since_fired > cfg.dead_window_steps
    if not dead.any() or dead.all():
        return 0
    index = dead.nonzero().squeeze(1)
    x = batch.to(sae.device, torch.float32) * state.input_scale
    residual = x - sae.decode(sae.encode(x))
    weights = residual.pow(2).sum(-1)
    picks = torch.multinomial(weights / weights.sum(), index.numel(), replacement=index.numel() > len(x))
    rows = residual[picks]
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    live_norm = sae.W_enc.norm(dim=0)[~dead].median()
    sae.W_dec[index] = rows
    sae.W_enc[:, index] = rows.T * live_norm * norm_share
    sae.b_enc[index] = sae.b_enc[~dead].median()
    for param, where in (
        (sae.W_enc, (slice(None), index)),
        (sae.b_enc, (index,)),
        (sae.W_dec, (index,)),
    ):
        moments = state.optimizer.state.get(param)
        if moments:
            moments["exp_avg"][where] = 0
            moments["exp_avg_sq"][where] = 0
    state.steps_since_fired[index] = 0
    return int(index.numel())


def _tracing(
    trainer: Any, batches: Iterable[torch.Tensor], trace: list[dict[str, int]]
) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if step and step % 25 == 0:
            silent = trainer.state.steps_since_fired > 10
            norms = trainer.sae.W_enc.detach().norm(dim=0)
            trace.append(
                {
                    "step": step,
                    "dead50": int((trainer.state.steps_since_fired > 50).sum()),
                    "dead10": int(silent.sum()),
                    "enc_norm_live": float(norms[~silent].median()),
                    "enc_norm_dead": float(norms[silent].median()) if silent.any() else 0.0,
                    "b_enc_live": float(trainer.sae.b_enc.detach()[~silent].median()),
                    "b_enc_dead": float(trainer.sae.b_enc.detach()[silent].median()) if silent.any() else 0.0,
                }
            )
        yield batch


def _retying(
    trainer: Any, batches: Iterable[torch.Tensor], every: int, until: int, log: list[tuple[int, int]]
) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if step and step % every == 0 and step < until:
            log.append((step, _retie(trainer, every)))
        yield batch


@torch.no_grad()
def _retie(trainer: Any, window: int) -> int:
    state, sae = trainer.state, trainer.sae
    dead = state.steps_since_fired > window
    if not dead.any() or dead.all():
        return 0
    index = dead.nonzero().squeeze(1)
    live_norm = sae.W_enc.norm(dim=0)[~dead].median()
    rows = sae.W_dec[index]
    sae.W_enc[:, index] = (rows / rows.norm(dim=-1, keepdim=True)).T * live_norm
    sae.b_enc[index] = sae.b_enc[~dead].median()
    for param, where in ((sae.W_enc, (slice(None), index)), (sae.b_enc, (index,))):
        moments = state.optimizer.state.get(param)
        if moments:
            moments["exp_avg"][where] = 0
            moments["exp_avg_sq"][where] = 0
    state.steps_since_fired[index] = 0
    return int(index.numel())
