"""Training experiments that the configuration does not offer, for `bench_quality.py --variant`.

A variant name is a comma-separated list of `key=value` changes to our trainer (docs/quality.md
has the rows they produced):

- `enc_scale=S`: multiply the initial encoder (the decoder's transpose) by S;
- `enc_lr=M`: train `W_enc` at M times the learning rate;
- `retie=N`: every N steps until 80% of the run, give each latent that has not fired for N steps
  its decoder row (at the median live encoder norm) as its encoder column, the median live b_enc,
  and fresh Adam moments for both.

Every variant also records, every 25 steps, how many latents had not fired for 50 steps (`trace`).

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
    unknown = set(changes) - {"enc_scale", "enc_lr", "retie"}
    if unknown:
        raise ValueError(f"unknown variant keys {sorted(unknown)}")
    cfg = LanguageModelSAERunnerConfig(**cfg_kwargs)
    sae = SparseAutoencoder(cfg)
    trainer = SAETrainer(cfg, sae, show_progress=False)
    if "enc_scale" in changes:
        with torch.no_grad():
            sae.W_enc.mul_(float(changes["enc_scale"]))
    if "enc_lr" in changes:
        # Adam keeps one group per parameter list; W_enc is in the first (base-lr) group, so move it.
        state = trainer.state
        base = state.optimizer.param_groups[0]
        base["params"] = [p for p in base["params"] if p is not sae.W_enc]
        state.optimizer.add_param_group({"params": [sae.W_enc], "lr": state.lr * float(changes["enc_lr"])})
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, state.scheduler.lr_lambdas[0])
    stream: Iterable[torch.Tensor] = batches
    retied: list[tuple[int, int]] = []
    if "retie" in changes:
        every = int(changes["retie"])
        stream = _retying(trainer, stream, every, int(0.8 * cfg.total_training_steps), retied)
    trace: list[dict[str, int]] = []
    trainer.fit(_tracing(trainer, stream, trace))
    return sae, {"lr_used": trainer.state.lr, "trace": trace, "retied": retied}


def _tracing(
    trainer: Any, batches: Iterable[torch.Tensor], trace: list[dict[str, int]]
) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(batches):
        if step and step % 25 == 0:
            trace.append({"step": step, "dead50": int((trainer.state.steps_since_fired > 50).sum())})
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
