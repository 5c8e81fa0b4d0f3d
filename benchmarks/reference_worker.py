"""One measurement of the reference SAELens (sae-lens 6.x), run in its own process.

This file is started by ``benchmarks/bench_training.py --reference-python PATH`` under the
reference's own interpreter, *by path*, so that ``sys.path[0]`` is ``benchmarks/`` and the installed
reference ``sae_lens`` is imported instead of ours (the package names collide). It must therefore
never import our package. Usage (normally only the driver calls it)::

    /tmp/ref-venv/bin/python benchmarks/reference_worker.py '{"kind": "sae", "arch": "topk", ...}'

It prints one line ``BENCH_RESULT {json}`` on stdout.

The first half of this file is the measurement harness (threads, timing, peak memory, result
line). ``bench_training.py`` imports it from here too, so ours and the reference are timed and
measured by the same code. The second half builds the reference's workload:

* ``sae``: the reference's training SAE for the architecture (from its registry,
  ``get_sae_training_class``) driven by the reference's own ``SAETrainer``: per step
  ``maybe_reset_sparsity()``, ``step(batch)`` (training_forward_pass with the dead-neuron mask and
  coefficients, firing statistics, backward, ``clip_grad_norm_``, Adam, zero_grad, LR and
  coefficient schedulers), ``n_training_steps += 1`` -- exactly the per-step work of
  ``SAETrainer.fit`` with wandb logging, checkpoints and the progress bar off.
* ``e2e``: a TransformerLens ``HookedTransformer`` (random weights, GPT-2 shape) and, per step,
  the reference ``ActivationsStore.get_activations`` (``run_with_cache(names_filter=[hook],
  stop_at_layer=layer + 1, prepend_bos=False)`` and the copy into a fresh buffer), then the
  ``sae`` step above on the flattened activations.
* ``model_fwd``: only the ``get_activations`` call of ``e2e``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


def run_worker_process(
    command: list[str], spec: dict[str, Any], env: dict[str, str], timeout: float, prefix: str = RESULT_PREFIX
) -> dict[str, Any]:
    """Run one worker (`command` + the spec as JSON) from a neutral folder; its result dict (the last
    stdout line starting with `prefix`), or one with `error` and the tail of its output."""
    import subprocess
    import tempfile

    try:
        done = subprocess.run(
            [*command, json.dumps(spec)],
            env=env,
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    return {"error": f"worker exited with {done.returncode}:\n{tail}"}


# -- measurement harness (shared with bench_training.py) ----------------------------------------


def configure_threads(n_threads: int) -> None:
    """Use `n_threads` intra-op threads (the env vars are also set by the driver)."""
    import torch

    torch.set_num_threads(n_threads)


def _proc_status_kb(field: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, and so ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class MemoryProbe:
    """Peak memory of the timed region above the "data and model ready" state.

    CPU: at `start` the current RSS is read and the kernel's peak-RSS mark is reset to it; at
    `stop` the peak mark (VmHWM == ru_maxrss) minus the start RSS is the peak extra memory. Where
    the reset is unavailable it falls back to the `ru_maxrss` delta, which under-reports when
    setup had a higher transient peak. CUDA: `max_memory_allocated` above `memory_allocated` at
    start (the caching allocator's tensors, not its reserved pool).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = ""
        self.ready_mb = 0.0
        self._start_kb = 0

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.ready_mb = torch.cuda.memory_allocated() / 2**20
            self.method = "cuda max_memory_allocated - memory_allocated at ready"
            return
        rss = _proc_status_kb("VmRSS")
        if rss is not None and _reset_peak_rss():
            self._start_kb = rss
            self.method = "VmHWM (ru_maxrss) after reset at ready - VmRSS at ready"
        else:
            self._start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss delta"
        self.ready_mb = self._start_kb / 1024

    def stop(self) -> dict[str, float | str]:
        """`peak_mb` (extra over ready), `ready_mb`, `abs_peak_mb` and the method used."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {
                "peak_mb": peak - self.ready_mb,
                "ready_mb": self.ready_mb,
                "abs_peak_mb": peak,
                "memory_method": self.method,
            }
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = _proc_status_kb("VmHWM")
        if hwm is not None and self.method.startswith("VmHWM"):
            peak_kb = hwm
        return {
            "peak_mb": max(0.0, (peak_kb - self._start_kb) / 1024),
            "ready_mb": self.ready_mb,
            "abs_peak_mb": peak_kb / 1024,
            "memory_method": self.method,
        }


def synchronize(device: str) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(step: Callable[[int], Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Run `spec["warmup"]` untimed then `spec["steps"]` timed calls of `step(i)`.

    Memory is measured from just before the warm-up (so first-step allocations such as Adam's
    state count) to after the last timed step. Returns the median step time, tokens/s and memory.
    """
    device = spec["device"]
    probe = MemoryProbe(device)
    probe.start()
    for i in range(spec["warmup"]):
        step(i)
    synchronize(device)
    times: list[float] = []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        step(i)
        synchronize(device)
        times.append(time.perf_counter() - started)
    memory = probe.stop()
    median = statistics.median(times)
    return {
        "step_s": times,
        "median_step_s": median,
        "tokens_per_s": spec["batch_tokens"] / median,
        **memory,
    }


def emit(result: dict[str, Any]) -> None:
    """Print the one result line the driver parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(
    spec: dict[str, Any],
    kinds: dict[str, Callable[[dict[str, Any]], dict[str, Any]]],
    info: dict[str, str],
) -> int:
    """Run `kinds[spec["kind"]]` and print its result with `info` (versions) added; 0 on success."""
    import torch

    if spec["kind"] not in kinds:
        raise SystemExit(f"unknown measurement kind {spec['kind']!r}; known: {', '.join(kinds)}")
    configure_threads(spec["threads"])
    base = {key: spec[key] for key in ("impl", "kind", "arch", "device", "dtype", "batch_tokens")}
    base.update(info, torch=torch.__version__, threads=torch.get_num_threads())
    try:
        result = kinds[spec["kind"]](spec)
    except SkipMeasurement as skip:
        emit({**base, "skipped": str(skip)})
        return 0
    emit({**base, **result})
    return 0


class SkipMeasurement(Exception):
    """The implementation has nothing to measure for this spec (e.g. an unknown architecture)."""


def token_pool(spec: dict[str, Any]) -> list[Any]:
    """`spec["pool"]` batches of random token ids `[batch_tokens // context, context]`, fixed seed."""
    import torch

    generator = torch.Generator().manual_seed(spec["seed"])
    rows = spec["batch_tokens"] // spec["context"]
    shape = (rows, spec["context"])
    return [
        torch.randint(0, spec["vocab"], shape, generator=generator).to(spec["device"])
        for _ in range(spec["pool"])
    ]


def activation_pool(spec: dict[str, Any]) -> list[Any]:
    """`spec["pool"]` batches of standard-normal activations `[batch_tokens, d_in]`, fixed seed."""
    import torch

    generator = torch.Generator().manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    shape = (spec["batch_tokens"], spec["d_in"])
    return [torch.randn(shape, generator=generator).to(spec["device"], dtype) for _ in range(spec["pool"])]


# -- the reference's workload -------------------------------------------------------------------


def _check_reference_import() -> Any:
    """Import the installed reference sae_lens, refusing our repository's package."""
    repo_root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != repo_root]
    import sae_lens

    location = Path(sae_lens.__file__).resolve()
    if repo_root in location.parents:
        raise RuntimeError(f"imported our sae_lens ({location}) instead of the reference")
    return sae_lens


def build_reference_trainer(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The reference training SAE for `spec["arch"]` and its `SAETrainer`, as its runner builds them."""
    # ruff would sort these as if some were our package's modules; they are the reference's.
    import torch  # noqa: I001
    from sae_lens.config import SAETrainerConfig  # type: ignore[attr-defined]  # mypy sees ours
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.training.sae_trainer import SAETrainer

    arch = spec["arch"]
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise SkipMeasurement(
            f"the reference has no training architecture {arch!r} "
            f"(it has: {', '.join(sorted(SAE_TRAINING_CLASS_REGISTRY))})"
        )
    sae_cls, cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch]
    wanted: dict[str, Any] = {
        "d_in": spec["d_in"],
        "d_sae": spec["d_in"] * spec["expansion"],
        "dtype": spec["dtype"],
        "device": spec["device"],
        "k": spec["k"],
        "matryoshka_widths": list(spec["matryoshka_widths"]),
        "use_sparse_activations": spec.get("reference_sparse_topk", False),
    }
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    cfg = cfg_cls(**{name: value for name, value in wanted.items() if name in names})
    torch.manual_seed(spec["seed"])
    sae = sae_cls(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=10**12,
        train_batch_size_samples=spec["batch_tokens"],
        lr=spec["lr"],
        lr_end=spec["lr"] / 10,
        device=spec["device"],
        dead_feature_window=spec["dead_feature_window"],
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    trainer.sae.to(spec["device"])  # fit() does this before its loop
    return sae, trainer


def reference_train_step(trainer: Any, batch: Any) -> None:
    """One iteration of the reference `SAETrainer.fit` loop, with logging and checkpoints off."""
    trainer.maybe_reset_sparsity()
    trainer.step(batch)
    trainer.n_training_steps += 1


def build_reference_model(spec: dict[str, Any]) -> Any:
    """A randomly initialised GPT-2-shaped `HookedTransformer` (the same shape as ours)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=spec["n_layers"],
        d_model=spec["d_in"],
        n_heads=spec["n_heads"],
        d_head=spec["d_in"] // spec["n_heads"],
        d_mlp=4 * spec["d_in"],
        n_ctx=spec["n_ctx"],
        d_vocab=spec["vocab"],
        act_fn="gelu_new",
        normalization_type="LN",
        dtype=getattr(torch, spec["dtype"]),
        device=spec["device"],
        seed=spec["seed"],
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def reference_activation_fn(model: Any, spec: dict[str, Any]) -> Callable[[Any], Any]:
    """`tokens -> [tokens, d_in]` activations through the reference `ActivationsStore.get_activations`.

    The method is called unbound on a stand-in holding just the attributes it reads, so the
    reference's own code (run_with_cache with stop_at_layer, the copy into a new buffer) runs.
    """
    import torch
    from sae_lens.training.activations_store import ActivationsStore

    store = types.SimpleNamespace(
        model=model,
        autocast_lm=False,
        hook_name=spec["hook"],
        seqpos_slice=(None,),
        device=torch.device(spec["device"]),
        d_in=spec["d_in"],
        hook_head_index=None,
        model_kwargs={},
    )

    def activations(tokens: Any) -> Any:
        acts = ActivationsStore.get_activations(store, tokens)  # type: ignore[arg-type]
        return acts.reshape(-1, spec["d_in"])

    return activations


def measure_sae(spec: dict[str, Any]) -> dict[str, Any]:
    """SAE-only: reference trainer steps on a cycled pool of in-memory activation batches."""
    _, trainer = build_reference_trainer(spec)
    pool = activation_pool(spec)
    return measure(lambda i: reference_train_step(trainer, pool[i % len(pool)]), spec)


def measure_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """End to end: reference `get_activations` (model to the hooked layer) + one trainer step."""
    _, trainer = build_reference_trainer(spec)
    model = build_reference_model(spec)
    activations = reference_activation_fn(model, spec)
    pool = token_pool(spec)
    return measure(lambda i: reference_train_step(trainer, activations(pool[i % len(pool)])), spec)


def measure_model_fwd(spec: dict[str, Any]) -> dict[str, Any]:
    """Only the reference `get_activations` call of the end-to-end step."""
    model = build_reference_model(spec)
    activations = reference_activation_fn(model, spec)
    pool = token_pool(spec)
    return measure(lambda i: activations(pool[i % len(pool)]), spec)


REFERENCE_KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sae": measure_sae,
    "e2e": measure_e2e,
    "model_fwd": measure_model_fwd,
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sae_lens = _check_reference_import()
    spec["impl"] = "reference"
    info = {"sae_lens": sae_lens.__version__, "transformer_lens": package_version("transformer-lens")}
    return run_worker(spec, REFERENCE_KINDS, info)


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "unknown"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
