"""SAE training throughput from an activation cache on disk, against the same batches already in RAM.

Run from the repository root with the venv active (the machine is shared: use nice)::

    nice -n 10 python benchmarks/bench_cached_activations.py              # 3 workers x 6 rounds
    nice -n 10 python benchmarks/bench_cached_activations.py --workers 5 --json out.json
    python benchmarks/bench_cached_activations.py --quick                 # a smoke test

Workload: a TopK SAE (k=32, 16x: d_sae 6144) on d_in 384 activations (all-MiniLM-L6-v2's width),
4096 tokens per step, float32, 2 threads (`--threads`), SAE-only (no model): `SAETrainer.train_step`
inside the trainer's allocator policy, as the runner drives it.

The cache: `--cache-batches` batches of synthetic activations (seeded normal, so the numbers are the
same on every machine) written in the `sae-lens cache` format: 65,536-token shards holding the
activations, token ids, positions and row ids, each with its sha256 in the manifest. The cached
source is `CachedActivationsStore` as training uses it: 32 batches in its buffer (the runner's
`n_batches_in_buffer` default), 8 open shards, checksums verified when a shard is first read,
cycling through the cache. The in-memory source is `--block` of the same batches as contiguous
tensors, cycled: nothing to read, shuffle or check.

Interleaving (the machine is shared and its load drifts by tens of percent within a minute): each
worker process builds one trainer, warms it up on both sources (the store's first fill included),
then runs rounds of `--block` steps from each source, alternating step by step (memory, cache,
memory, ...; the cache first in odd rounds), so that both sources see the same load. A round spans
16 cached batches: one refill of the store's 32-batch buffer, so each round pays for exactly one
refill. A source's throughput in a round is its tokens over the summed time of its steps (the
cached steps include `next_batch()`). Reported: the median round throughput of each source, and
the median over rounds of the cached/in-memory ratio of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Our package from this checkout even where it is not installed.
sys.path.insert(0, str(REPO_ROOT))

RESULT_PREFIX = "BENCH_RESULT "
HOOK = "blocks.3.hook_resid_post"
WORKLOAD: dict[str, Any] = {
    "d_in": 384,
    "expansion": 16,
    "k": 32,
    "batch_tokens": 4096,
    "dtype": "float32",
    "shard_tokens": 65_536,
    "buffer_batches": 32,
    "open_shards": 8,
    "seed": 0,
    "dead_feature_window": 1000,
}
"""The fixed workload. `dead_feature_window` (the reference's default, as in bench_training.py) keeps
the dead-latent loss out of a short run, so every step costs the same."""
TARGET_RATIO = 0.90


# -- the cache ----------------------------------------------------------------------------------------


def write_cache(folder: Path, n_batches: int, spec: dict[str, Any]) -> None:
    """`n_batches * batch_tokens` seeded normal activations in the cache format."""
    import torch

    from sae_lens.cached_activations import (
        new_manifest,
        shard_filename,
        write_manifest,
        write_safetensors_checked,
    )

    n_tokens = n_batches * spec["batch_tokens"]
    manifest = new_manifest(
        model_name="sentence-transformers/all-MiniLM-L6-v2",
        hook_widths={HOOK: spec["d_in"]},
        dtype=spec["dtype"],
        context_size=128,
        config={"synthetic": True},
    )
    generator = torch.Generator().manual_seed(spec["seed"])
    for index, start in enumerate(range(0, n_tokens, spec["shard_tokens"])):
        size = min(spec["shard_tokens"], n_tokens - start)
        rows = torch.arange(start, start + size)
        tensors = {
            HOOK: torch.randn(size, spec["d_in"], generator=generator),
            "token_ids": torch.randint(0, 30522, (size,), generator=generator),
            "positions": rows % 128,
            "row_ids": rows // 128,
        }
        manifest["shards"].append(write_safetensors_checked(folder, shard_filename(index), tensors))
        manifest["n_tokens"] += size
    manifest["complete"] = True
    write_manifest(folder, manifest)


# -- one worker -------------------------------------------------------------------------------------


def build_trainer(spec: dict[str, Any]) -> Any:
    import torch

    from sae_lens.config import LanguageModelSAERunnerConfig
    from sae_lens.saes import SparseAutoencoder
    from sae_lens.training.trainer import SAETrainer

    cfg = LanguageModelSAERunnerConfig(
        architecture="topk",
        k=spec["k"],
        d_in=spec["d_in"],
        expansion_factor=spec["expansion"],
        train_batch_size=spec["batch_tokens"],
        dead_feature_window=spec["dead_feature_window"],
        dtype=spec["dtype"],
        seed=spec["seed"],
    )
    torch.manual_seed(spec["seed"])
    sae = SparseAutoencoder.from_config(cfg.sae_config(spec["d_in"]))
    return SAETrainer(cfg, sae, show_progress=False)


def in_memory_batches(cache: Path, n_batches: int, batch_tokens: int) -> list[Any]:
    """The cache's first `n_batches` batches as contiguous tensors in RAM."""
    import torch
    from safetensors import safe_open

    from sae_lens.cached_activations import read_manifest

    rows = []
    for entry in read_manifest(cache)["shards"]:
        with safe_open(str(cache / entry["file"]), framework="pt") as file:
            rows.append(file.get_tensor(HOOK).clone())
        if sum(part.shape[0] for part in rows) >= n_batches * batch_tokens:
            break
    flat = torch.cat(rows)[: n_batches * batch_tokens]
    return [batch.clone() for batch in flat.split(batch_tokens)]


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Rounds of steps alternating between the in-memory batches and the cache, in one process."""
    import torch

    from sae_lens.cached_activations import CachedActivationsStore

    torch.set_num_threads(spec["threads"])
    cache = Path(spec["cache"])
    trainer = build_trainer(spec)
    pool = in_memory_batches(cache, spec["block"], spec["batch_tokens"])
    store = CachedActivationsStore(
        cache,
        train_batch_size=spec["batch_tokens"],
        n_batches_in_buffer=spec["buffer_batches"],
        n_open_shards=spec["open_shards"],
        n_epochs=None,
        seed=spec["seed"] + spec["worker"],
    )
    sources = {"memory": lambda i: pool[i % len(pool)], "cache": lambda i: store.next_batch()}
    per_round: dict[str, list[float]] = {"memory": [], "cache": []}
    ratios = []
    with trainer.allocator_policy():
        # Warm-up: the trainer's first steps, and the store's first fill (a whole buffer, once per run).
        for i in range(spec["warmup"]):
            trainer.train_step(pool[i % len(pool)], return_metrics=False)
        for _ in range(spec["buffer_batches"] // 2):
            trainer.train_step(store.next_batch(), return_metrics=False)
        for round_index in range(spec["rounds"]):
            # Step by step, alternating, so both sources see the same load; a round spans one refill.
            order = ["memory", "cache"] if round_index % 2 == 0 else ["cache", "memory"]
            seconds = {"memory": 0.0, "cache": 0.0}
            for i in range(spec["block"]):
                for name in order:
                    started = time.perf_counter()
                    trainer.train_step(sources[name](i), return_metrics=False)
                    seconds[name] += time.perf_counter() - started
            speeds = {name: spec["block"] * spec["batch_tokens"] / seconds[name] for name in seconds}
            for name, speed in speeds.items():
                per_round[name].append(speed)
            ratios.append(speeds["cache"] / speeds["memory"])
    return {
        "worker": spec["worker"],
        "tokens_per_s": per_round,
        "ratios": ratios,
        "threads": torch.get_num_threads(),
    }


# -- driver -----------------------------------------------------------------------------------------


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    raise SystemExit(f"worker {spec['worker']} exited with {done.returncode}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="worker processes, one after another")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (one store refill each) per worker")
    parser.add_argument(
        "--block", type=int, default=16, help="steps per source per round (default 16: half the buffer)"
    )
    parser.add_argument("--warmup", type=int, default=4, help="untimed in-memory steps first")
    parser.add_argument("--cache-batches", type=int, default=96, help="batches in the cache (96: 590 MB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", help="write the cache here (default: a temporary folder)")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--quick", action="store_true", help="1 worker, 1 round of 2 steps per source")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker_main(json.loads(args.worker))), flush=True)
        return 0
    spec = {
        **WORKLOAD,
        "threads": args.threads,
        "rounds": args.rounds,
        "block": args.block,
        "warmup": args.warmup,
    }
    cache_batches = args.cache_batches
    if args.quick:
        spec.update(rounds=1, block=2, warmup=1, buffer_batches=4)
        args.workers, cache_batches = 1, 8

    with tempfile.TemporaryDirectory(prefix="bench_cache_") as scratch:
        cache = Path(args.cache_dir or scratch) / "cache"
        started = time.perf_counter()
        write_cache(cache, cache_batches, spec)
        size_mb = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
        print(
            f"cache: {cache_batches * spec['batch_tokens']:,} tokens, {size_mb:.0f} MB "
            f"written in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        results = []
        for worker in range(args.workers):
            result = run_worker({**spec, "cache": str(cache), "worker": worker}, timeout=3600)
            results.append(result)
            memory, cached = (statistics.median(result["tokens_per_s"][name]) for name in ("memory", "cache"))
            print(
                f"  worker {worker}: in-memory {memory:,.0f} tok/s, cache {cached:,.0f} tok/s, "
                f"median round ratio {statistics.median(result['ratios']):.3f}",
                file=sys.stderr,
                flush=True,
            )

    memory_all = [speed for r in results for speed in r["tokens_per_s"]["memory"]]
    cache_all = [speed for r in results for speed in r["tokens_per_s"]["cache"]]
    ratios = [ratio for r in results for ratio in r["ratios"]]
    summary = {
        "workload": spec,
        "in_memory_tokens_per_s": statistics.median(memory_all),
        "cache_tokens_per_s": statistics.median(cache_all),
        "ratio_of_medians": statistics.median(cache_all) / statistics.median(memory_all),
        "median_round_ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "n_rounds": len(memory_all),
        "target": TARGET_RATIO,
    }
    print(
        f"\nTopK k=32 16x d_in 384, batch 4096, float32, {spec['threads']} threads, SAE-only "
        f"({len(memory_all)} rounds of {spec['block']} steps per source)\n"
        f"  in memory     {summary['in_memory_tokens_per_s']:>10,.0f} tok/s (median round)\n"
        f"  from cache    {summary['cache_tokens_per_s']:>10,.0f} tok/s (median round)\n"
        f"  cache/memory  {summary['median_round_ratio']:.3f} (median of {len(ratios)} same-round ratios; "
        f"ratio of medians {summary['ratio_of_medians']:.3f}; target >= {TARGET_RATIO})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "workers": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
