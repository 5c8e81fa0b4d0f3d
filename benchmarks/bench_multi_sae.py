"""N SAEs from one run (one forward pass per batch) against N separate runs: wall and CPU time.

Run from the repository root with our venv active::

    python benchmarks/bench_multi_sae.py                    # the main job's budget: 300k tokens, batch 1024
    python benchmarks/bench_multi_sae.py --small            # 50k tokens: a few minutes on a laptop CPU
    python benchmarks/bench_multi_sae.py --tokens 100000 --repeats 3 --json out.json

Workload: all-MiniLM-L6-v2 on the embedded ``builtin:python-docs`` corpus, the CLI's defaults
otherwise (TopK, 16x, context 128, 32 held-out rows), a 2-layer x 2-hyperparameter sweep: hooks
``blocks.1.hook_resid_post`` and ``blocks.3.hook_resid_post``, k in {16, 32}, 4 SAEs.

* separate: 4 runs of ``sae-lens train``, one per (hook, k), one after another.
* one run: ``sae-lens train --hook_point blocks.1...,blocks.3... --k 16,32``: the model runs once per
  batch (up to block 3) and the 4 SAEs train on the same batches.

Each run is a fresh ``python -m sae_lens train`` process, timed whole: interpreter start, model
load, activations, training, the final evals and the saves, since that is what a user waits for.
CPU time is the child's user + system time. With ``--repeats`` the median of each is reported, the
order of the two modes alternating between repeats. Target: one run takes at most 0.4x the time of
the separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
KS = (16, 32)
TARGET_RATIO = 0.4


@dataclass
class Measurement:
    """One `sae-lens train` process."""

    label: str
    wall_s: float
    cpu_s: float
    explained_variance: dict[str, float] = field(default_factory=dict)
    """Final held-out explained variance of each SAE the run trained, by run name."""


def _summaries(stdout: str) -> dict[str, float]:
    """`{run name: explained variance}` from the CLI's summaries."""
    found = {}
    for block in stdout.split("Summary (held-out tokens)")[1:]:
        name = re.match(r":\s*(\S+)", block)
        value = re.search(r"explained variance\s+([-\d.]+)", block)
        if name and value:
            found[name.group(1)] = float(value.group(1))
    return found


def run_cli(label: str, flags: list[str], env: dict[str, str]) -> Measurement:
    """Run `python -m sae_lens train FLAGS --quiet` to the end; fail loudly if it fails."""
    command = [sys.executable, "-m", "sae_lens", "train", *flags, "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measurement(label, wall, cpu, _summaries(result.stdout))


def common_flags(tokens: int, batch: int, out: Path, run_name: str) -> list[str]:
    return [
        "--total_training_tokens", str(tokens),
        "--train_batch_size", str(batch),
        "--checkpoint_path", str(out),
        "--run_name", run_name,
    ]  # fmt: skip


def one_repeat(
    tokens: int, batch: int, out: Path, env: dict[str, str], separate_first: bool
) -> list[Measurement]:
    def separate() -> list[Measurement]:
        runs = []
        for hook in HOOKS:
            for k in KS:
                name = f"{hook.split('.')[1]}-k{k}"
                flags = ["--hook_point", hook, "--k", str(k), *common_flags(tokens, batch, out, name)]
                runs.append(run_cli(f"separate: blocks.{hook.split('.')[1]} k={k}", flags, env))
        return runs

    def together() -> list[Measurement]:
        flags = ["--hook_point", ",".join(HOOKS), "--k", ",".join(map(str, KS))]
        return [run_cli("one run, 4 SAEs", [*flags, *common_flags(tokens, batch, out, "sweep")], env)]

    first, second = (separate, together) if separate_first else (together, separate)
    return first() + second()


def report(repeats: list[list[Measurement]], tokens: int, batch: int, threads: int) -> dict[str, Any]:
    """Print the table; return the medians and the ratios."""
    labels = [m.label for m in repeats[0]]
    median = {
        label: {
            "wall_s": statistics.median(m.wall_s for rep in repeats for m in rep if m.label == label),
            "cpu_s": statistics.median(m.cpu_s for rep in repeats for m in rep if m.label == label),
        }
        for label in labels
    }
    separate = [label for label in labels if label.startswith("separate")]
    totals = {key: sum(median[label][key] for label in separate) for key in ("wall_s", "cpu_s")}
    together = median["one run, 4 SAEs"]
    ratios = {key: together[key] / totals[key] for key in totals}

    print(f"\n{len(HOOKS) * len(KS)} SAEs (hooks {', '.join(HOOKS)}; k {', '.join(map(str, KS))}), ", end="")
    print(f"{tokens:,} tokens each, batch {batch}, {threads} threads, median of {len(repeats)}")
    print(f"{'':34} {'wall s':>9} {'CPU s':>9}")
    for label in separate:
        print(f"  {label:32} {median[label]['wall_s']:9.1f} {median[label]['cpu_s']:9.1f}")
    print(f"{'4 separate runs (sum)':34} {totals['wall_s']:9.1f} {totals['cpu_s']:9.1f}")
    print(f"{'one run, 4 SAEs':34} {together['wall_s']:9.1f} {together['cpu_s']:9.1f}")
    verdict = "met" if ratios["wall_s"] <= TARGET_RATIO else "NOT met"
    print(f"{'ratio (one run / separate)':34} {ratios['wall_s']:9.2f} {ratios['cpu_s']:9.2f}   ", end="")
    print(f"target <= {TARGET_RATIO} (wall): {verdict}")

    print("\nfinal held-out explained variance (last repeat)")
    last = repeats[-1]
    sweep = next(m for m in last if m.label == "one run, 4 SAEs").explained_variance
    single = {
        name: ev for m in last if m.label.startswith("separate") for name, ev in m.explained_variance.items()
    }
    for (name, ev), (sweep_name, sweep_ev) in zip(
        sorted(single.items()), sorted(sweep.items()), strict=False
    ):
        print(f"  separate {name:12} {ev:.3f}    one run {sweep_name:36} {sweep_ev:.3f}")
    return {"median": median, "separate_total": totals, "ratio": ratios, "target_ratio": TARGET_RATIO}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens of each SAE")
    parser.add_argument("--small", action="store_true", help="a smaller budget: 50,000 tokens")
    parser.add_argument("--batch", type=int, default=1024, help="train_batch_size")
    parser.add_argument("--repeats", type=int, default=1, help="measure each mode this many times")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--out", help="write the runs' folders here (default: a temporary folder)")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    tokens = 50_000 if args.small else args.tokens

    env = dict(os.environ)
    env.update(
        {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    )
    repeats = []
    with tempfile.TemporaryDirectory(prefix="bench_multi_sae_") as scratch:
        out = Path(args.out) if args.out else Path(scratch)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats} ...", flush=True)
            repeats.append(
                one_repeat(tokens, args.batch, out / f"repeat{repeat}", env, separate_first=repeat % 2 == 0)
            )
    summary = report(repeats, tokens, args.batch, args.threads)
    if args.json:
        record = {
            "tokens": tokens,
            "batch": args.batch,
            "threads": args.threads,
            "repeats": [[asdict(m) for m in rep] for rep in repeats],
            **summary,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
