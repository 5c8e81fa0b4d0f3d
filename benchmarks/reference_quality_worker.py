"""One quality run of the reference SAELens (sae-lens 6.x), and the code both libraries share.

``benchmarks/bench_quality.py`` starts this file *by path* under the reference's own interpreter,
so ``sys.path[0]`` is ``benchmarks/`` and the installed reference ``sae_lens`` is imported instead
of ours (the package names collide). It must never import our package. Usage (normally only the
driver calls it)::

    /tmp/ref-venv/bin/python benchmarks/reference_quality_worker.py '{"arch": "topk", ...}'

It prints one line ``QUALITY_RESULT {json}`` on stdout and writes the held-out reconstructions to
``spec["recon_out"]``.

The first half of this file is shared with ``bench_quality.py`` (which imports it from here), so
that both libraries read the same activations in the same batch order and are scored by the same
code:

* ``load_activations`` / ``iter_batches``: the activation file (safetensors, float32, ``train``
  ``[n_train, d_in]`` and ``heldout`` ``[n_heldout, d_in]``) and the batch order file (``order``,
  int64 row indices into ``train``, ``tokens`` long); batch ``i`` is ``train[order[i*B:(i+1)*B]]``.
* ``reconstruct``: each library's own inference ``encode``/``decode`` over the held-out rows, with
  per-latent firing counts.
* ``reconstruction_metrics``: FVU (centred, float64), L0, dead fraction, from those arrays.

The second half trains the reference's own training SAE (``TopKTrainingSAE``,
``BatchTopKTrainingSAE``, ``JumpReLUTrainingSAE``, ``StandardTrainingSAE``) with its own
``SAETrainer.fit`` at its defaults, apart from what the spec overrides (``sae_config`` fields of the
training SAE config, ``trainer_config`` fields of ``SAETrainerConfig``), then saves its inference
form with ``save_inference_model`` and loads it back with ``SAE.load_from_disk``: the SAE a user of
the reference would evaluate (BatchTopK as JumpReLU, TopK with decoder norms folded).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULT_PREFIX = "QUALITY_RESULT "

# -- shared with bench_quality.py ----------------------------------------------------------------


def load_activations(path: str) -> dict[str, Any]:
    """The activation file: `train` `[n_train, d_in]` and `heldout` `[n_heldout, d_in]`, float32."""
    from safetensors.torch import load_file

    return load_file(path)


def load_order(path: str) -> Any:
    """The batch order: int64 indices into `train`, one per training token, `[tokens]`."""
    from safetensors.torch import load_file

    return load_file(path)["order"]


def iter_batches(train: Any, order: Any, batch_size: int) -> Iterator[Any]:
    """Batches `train[order[i*B:(i+1)*B]]` `[B, d_in]`, in order, until `order` runs out."""
    for start in range(0, order.shape[0] - batch_size + 1, batch_size):
        yield train[order[start : start + batch_size]]


def make_order(n_train: int, n_tokens: int, seed: int) -> Any:
    """`n_tokens` indices into `n_train` rows: a fixed-seed permutation per pass over the data.

    Pass `e` uses the permutation of `torch.Generator().manual_seed(seed + e)`, so a longer run
    starts with exactly the batches of a shorter one.
    """
    import torch

    parts, total, epoch = [], 0, 0
    while total < n_tokens:
        generator = torch.Generator().manual_seed(seed + epoch)
        part = torch.randperm(n_train, generator=generator)[: n_tokens - total]
        parts.append(part)
        total += part.shape[0]
        epoch += 1
    return torch.cat(parts)


def reconstruct(
    encode: Callable[[Any], Any], decode: Callable[[Any], Any], x: Any, chunk: int = 4096
) -> dict[str, Any]:
    """Run `decode(encode(x))` over held-out `x` `[n, d_in]` in chunks, without gradients.

    Returns `x_hat` `[n, d_in]` float32, `fire_counts` `[d_sae]` int64 (tokens on which each latent
    is non-zero) and `active` `[n]` int64 (non-zero latents per token).
    """
    import torch

    outputs, actives, fire_counts = [], [], None
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            feature_acts = encode(x[start : start + chunk])
            if feature_acts.is_sparse:
                feature_acts = feature_acts.to_dense()
            outputs.append(decode(feature_acts).float())
            fired = feature_acts != 0
            actives.append(fired.sum(dim=-1))
            counts = fired.sum(dim=0)
            fire_counts = counts if fire_counts is None else fire_counts + counts
    return {
        "x_hat": torch.cat(outputs).contiguous(),
        "fire_counts": fire_counts.long(),
        "active": torch.cat(actives).long(),
    }


def reconstruction_metrics(x: Any, x_hat: Any, fire_counts: Any, active: Any) -> dict[str, float]:
    """Held-out metrics of one SAE, the same code for both libraries.

    - `fvu` = Σ‖x - x̂‖² / Σ‖x - x̄‖² over held-out tokens, x̄ their mean, in float64 (centred);
      `explained_variance` = 1 - fvu.
    - `l0` = mean over tokens of the number of non-zero latents.
    - `dead_fraction` = fraction of latents that are non-zero on none of the held-out tokens.
    - `dense_fraction` = fraction of latents non-zero on more than 10% of them.
    """
    x64, x_hat64 = x.double(), x_hat.double()
    residual = (x64 - x_hat64).pow(2).sum()
    total = (x64 - x64.mean(dim=0)).pow(2).sum()
    fvu = float(residual / total)
    n = x.shape[0]
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": float(active.double().mean()),
        "dead_fraction": float((fire_counts == 0).double().mean()),
        "dense_fraction": float((fire_counts > 0.1 * n).double().mean()),
        "cosine_similarity": float(
            torch_cosine(x64, x_hat64).mean(),
        ),
    }


def torch_cosine(a: Any, b: Any) -> Any:
    """Row-wise cosine similarity `[n]` of `a`, `b` `[n, d]`."""
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def save_reconstruction(path: str, recon: dict[str, Any]) -> None:
    """Write `reconstruct`'s output as safetensors for the driver to score."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in recon.items()}, path)


def emit(result: dict[str, Any]) -> None:
    """Print the one result line the driver parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -- the reference's training ----------------------------------------------------------------------


def _check_reference_import() -> Any:
    """Import the installed reference sae_lens, refusing our repository's package."""
    repo_root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != repo_root]
    import sae_lens

    location = Path(sae_lens.__file__).resolve()
    if repo_root in location.parents:
        raise RuntimeError(f"imported our sae_lens ({location}) instead of the reference")
    return sae_lens


def reference_training_sae(spec: dict[str, Any], d_in: int) -> Any:
    """The reference training SAE for `spec["arch"]` from its registry, at its config defaults
    apart from the shape, `k` (TopK family) and `spec["sae_config"]`."""
    import dataclasses

    import torch
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    arch = spec["arch"]
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise SystemExit(f"the reference has no training architecture {arch!r}")
    sae_cls, cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch]
    wanted: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_in * spec["expansion"],
        "dtype": "float32",
        "device": "cpu",
        "k": spec.get("k"),
        **spec.get("sae_config", {}),
    }
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(spec.get("sae_config", {})) - names)
    if unknown:
        raise SystemExit(f"the reference {cfg_cls.__name__} has no fields {unknown}")
    cfg = cfg_cls(**{name: value for name, value in wanted.items() if name in names and value is not None})
    torch.manual_seed(spec["seed"])
    return sae_cls(cfg)


def train_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the reference SAE on the spec's batches; write its held-out reconstructions."""
    import torch  # noqa: I001
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig  # type: ignore[attr-defined]  # mypy sees ours
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(spec["threads"])
    data = load_activations(spec["acts"])
    order = load_order(spec["order"])[: spec["tokens"]]
    d_in = data["train"].shape[1]
    sae = reference_training_sae(spec, d_in)
    trainer_kwargs: dict[str, Any] = {
        "total_training_samples": spec["tokens"],
        "train_batch_size_samples": spec["batch"],
        "device": "cpu",
        **spec.get("trainer_config", {}),
    }
    if spec.get("lr") is not None:
        trainer_kwargs["lr"] = spec["lr"]
    # The reference's runner config fills lr_end in (lr / 10) before building SAETrainerConfig,
    # whose own default (None) SAETrainer refuses.
    if trainer_kwargs.get("lr_end") is None:
        lr = trainer_kwargs.get("lr", SAETrainerConfig.__dataclass_fields__["lr"].default)
        trainer_kwargs["lr_end"] = lr / 10
    trainer_cfg = SAETrainerConfig(**trainer_kwargs)
    trainer = SAETrainer(
        cfg=trainer_cfg, sae=sae, data_provider=iter_batches(data["train"], order, spec["batch"])
    )
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        sae.save_inference_model(folder)
        inference = SAE.load_from_disk(folder)
    inference.eval()
    recon = reconstruct(inference.encode, inference.decode, data["heldout"])
    save_reconstruction(spec["recon_out"], recon)
    return {
        "train_seconds": seconds,
        "tokens_trained": trainer.n_training_samples,
        "steps": trainer.n_training_steps,
        "lr_used": trainer_cfg.lr,
        "inference_architecture": inference.cfg.architecture(),
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sae_lens = _check_reference_import()
    result = train_reference(spec)
    emit({"impl": "reference", "sae_lens": sae_lens.__version__, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
