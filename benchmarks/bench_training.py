"""SAE training throughput (tokens/s) and peak memory, ours against the reference SAELens 6.x.

Run from the repository root with our venv active::

    python benchmarks/bench_training.py                       # ours only, every registered architecture
    python benchmarks/bench_training.py --reference-python /tmp/ref-venv/bin/python   # with ratios
    python benchmarks/bench_training.py --archs topk standard --settings sae e2e
    python benchmarks/bench_training.py --device cuda --dtype bfloat16   # or --dtype float32
    python benchmarks/bench_training.py --json out.json       # also save every raw measurement
    python benchmarks/bench_training.py --quick               # 1 warm-up + 2 timed steps: a smoke test

The reference venv: ``python3 -m venv /tmp/ref-venv && /tmp/ref-venv/bin/pip install torch==2.13.0
&& /tmp/ref-venv/bin/pip install "sae-lens>=6,<7"``.

Workload (the same for ours and the reference): d_in 512, 16x expansion (d_sae 8192), k 32,
4096 tokens per step, float32 (or ``--dtype``), 2 CPU threads (``--threads``).

Settings, per architecture:

* ``sae``: SAE-only training from in-memory activations (a fixed-seed pool of 8 random batches,
  cycled). Ours: ``SAETrainer.train_step(x, return_metrics=False)``. Reference: one iteration of
  its ``SAETrainer.fit`` loop (see ``reference_worker.py``).
* ``e2e``: model forward to the hooked layer plus the SAE step, per 4096 tokens (32 rows of 128
  random token ids). Ours: a random GPT-2 (4 layers, d_model 512) saved with ``save_pretrained``
  and loaded with ``sae_lens.models.load_model`` (a TransformerBridge), activations from
  ``ActivationsStore.get_activations`` (``run_with_cache(stop_at_layer=2)``). Reference: a random
  ``HookedTransformer`` of the same shape and its ``ActivationsStore.get_activations``.

Limits printed for context (forward only, no autograd): ``x @ W_enc`` alone; the raw Hugging Face
GPT-2 forward through the 2 blocks up to the hook (sdpa attention, no hooks); and each
implementation's ``get_activations`` alone. The issue's bound for a step is encoder matmul + model
forward.

Every measurement runs in a fresh subprocess (``--worker``), so its peak memory is its own:
warm-up steps then timed steps; the median step time gives tokens/s; peak memory is the high-water
RSS (CUDA: ``max_memory_allocated``) above the state with data, model and SAE ready.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Our package from this checkout even where it is not installed; the harness from beside this file.
sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]
import reference_worker as harness  # noqa: E402  (the shared timing/memory harness)

WORKLOAD: dict[str, Any] = {
    "d_in": 512,
    "expansion": 16,
    "k": 32,
    "batch_tokens": 4096,
    "context": 128,
    "vocab": 5000,
    "n_layers": 4,
    "n_heads": 8,
    "n_ctx": 256,
    "hook": "blocks.1.hook_resid_post",
    "hook_layer": 1,
    "seed": 0,
    "pool": 8,
    "lr": 1e-3,
    "dead_feature_window": 1000,
    "matryoshka_widths": [512, 2048, 8192],
}
"""The fixed workload. `dead_feature_window` is the reference's default, used by both so that
neither computes its dead-latent loss (AuxK / ghost grads) in a short run."""

SETTINGS = ("sae", "e2e")
TARGETS: dict[tuple[str, str], float] = {
    ("topk", "e2e"): 3.0,
    ("topk", "sae"): 3.0,
    ("standard", "sae"): 1.3,
    ("standard", "e2e"): 1.3,
}
"""Median tokens/s ratio (ours / reference) the issue asks for."""

LIMIT_LABELS = {
    ("ours", "enc_matmul"): "encoder matmul x @ W_enc (forward only)",
    ("ours", "hf_fwd"): "model forward to the hook: raw HF GPT-2, 2 blocks",
    ("ours", "model_fwd"): "model forward to the hook: ours (get_activations)",
    ("reference", "model_fwd"): "model forward to the hook: reference (get_activations)",
}


# -- our measurements (worker side) -------------------------------------------------------------


def build_our_trainer(spec: dict[str, Any]) -> Any:
    """Our `SAETrainer` around a fresh SAE of `spec["arch"]`, built from the runner config."""
    from sae_lens.config import LanguageModelSAERunnerConfig
    from sae_lens.saes import SparseAutoencoder
    from sae_lens.training.trainer import SAETrainer

    cfg = LanguageModelSAERunnerConfig(
        d_in=spec["d_in"],
        expansion_factor=spec["expansion"],
        k=spec["k"],
        architecture=spec["arch"],
        train_batch_size=spec["batch_tokens"],
        hook_point=spec["hook"],
        context_size=spec["context"],
        lr=spec["lr"],
        dead_feature_window=spec["dead_feature_window"],
        device=spec["device"],
        dtype=spec["dtype"],
        model_dtype=spec["dtype"],
        seed=spec["seed"],
        matryoshka_widths=list(spec["matryoshka_widths"]) if "matryoshka" in spec["arch"] else None,
        # The step's throughput: the once-per-run decoder refit (its accumulation in the last
        # steps and its solve, docs/quality.md) is timed in the main job and bench_quality instead.
        decoder_refit_tokens=0,
    )
    torch.manual_seed(spec["seed"])
    sae = SparseAutoencoder.from_config(cfg.sae_config(spec["d_in"]))
    return SAETrainer(cfg, sae, show_progress=False)


def our_activation_fn(spec: dict[str, Any]) -> Any:
    """`tokens -> [tokens, d_in]` through our model and `ActivationsStore.get_activations`."""
    from sae_lens.activations_store import ActivationsStore
    from sae_lens.models import load_model

    model = load_model(spec["model_dir"], device=spec["device"], dtype=spec["dtype"])
    store = ActivationsStore(
        model,
        [],
        hook_point=spec["hook"],
        hook_layer=spec["hook_layer"],
        context_size=spec["context"],
        train_batch_size=spec["batch_tokens"],
        dtype=spec["dtype"],
        device=spec["device"],
    )

    def activations(tokens: torch.Tensor) -> torch.Tensor:
        return store.get_activations(tokens).reshape(-1, spec["d_in"])

    return activations


def measure_sae(spec: dict[str, Any]) -> dict[str, Any]:
    """SAE-only: our trainer steps on a cycled pool of in-memory activation batches."""
    trainer = build_our_trainer(spec)
    pool = harness.activation_pool(spec)
    # The allocator setting `fit` holds while it trains (see sae_lens.cpu_memory).
    with trainer.allocator_policy():
        return harness.measure(lambda i: trainer.train_step(pool[i % len(pool)], return_metrics=False), spec)


def measure_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """End to end: our model forward to the hooked layer + one trainer step per batch."""
    trainer = build_our_trainer(spec)
    activations = our_activation_fn(spec)
    pool = harness.token_pool(spec)
    with trainer.allocator_policy():
        return harness.measure(
            lambda i: trainer.train_step(activations(pool[i % len(pool)]), return_metrics=False), spec
        )


def measure_model_fwd(spec: dict[str, Any]) -> dict[str, Any]:
    """Only our `get_activations` (model forward to the hooked layer)."""
    activations = our_activation_fn(spec)
    pool = harness.token_pool(spec)
    return harness.measure(lambda i: activations(pool[i % len(pool)]), spec)


def measure_enc_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """The limit of an SAE step: the bare encoder matmul `x @ W_enc`, forward only."""
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    dtype = getattr(torch, spec["dtype"])
    d_sae = spec["d_in"] * spec["expansion"]
    W_enc = (torch.randn(spec["d_in"], d_sae, generator=generator) * spec["d_in"] ** -0.5).to(
        spec["device"], dtype
    )
    pool = harness.activation_pool(spec)

    @torch.no_grad()
    def step(i: int) -> None:
        pool[i % len(pool)] @ W_enc

    return harness.measure(step, spec)


def measure_hf_fwd(spec: dict[str, Any]) -> dict[str, Any]:
    """The limit of the model half: the raw HF GPT-2 through the blocks up to the hook, no hooks."""
    from transformers import GPT2Model

    model = GPT2Model.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    model.h = model.h[: spec["hook_layer"] + 1]
    model.ln_f = torch.nn.Identity()  # type: ignore[assignment]
    model.to(spec["device"]).eval()
    pool = harness.token_pool(spec)

    @torch.no_grad()
    def step(i: int) -> None:
        model(input_ids=pool[i % len(pool)], use_cache=False)

    return harness.measure(step, spec)


LIMIT_KINDS = ("model_fwd", "enc_matmul", "hf_fwd")

OUR_KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sae": measure_sae,
    "e2e": measure_e2e,
    "model_fwd": measure_model_fwd,
    "enc_matmul": measure_enc_matmul,
    "hf_fwd": measure_hf_fwd,
}


def worker_main(spec_json: str) -> int:
    """Entry point of `--worker`: one measurement of ours, printed as a result line."""
    import transformer_lens  # noqa: F401  (import before timing; the version is reported below)

    spec = json.loads(spec_json)
    spec["impl"] = "ours"
    if spec["kind"] in LIMIT_KINDS and spec["device"] == "cpu":
        # Our trainer keeps freed memory for reuse on CPU (sae_lens.cpu_memory); the limits are
        # measured under the same allocator setting, so they bound what the trainer can reach.
        from sae_lens import cpu_memory

        cpu_memory.reuse_freed_memory()
    info = {
        "sae_lens": harness.package_version("sae-lens"),
        "transformer_lens": harness.package_version("transformer-lens"),
    }
    return harness.run_worker(spec, OUR_KINDS, info)


# -- driver -------------------------------------------------------------------------------------


def make_model_folder(folder: Path, spec: dict[str, Any]) -> None:
    """Save a randomly initialised GPT-2 of the workload's shape and a matching tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    special = "<|endoftext|>"
    vocab = {f"t{i}": i for i in range(spec["vocab"] - 1)}
    vocab[special] = spec["vocab"] - 1
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=special, eos_token=special, unk_token=special
    ).save_pretrained(folder)
    config = GPT2Config(
        n_layer=spec["n_layers"],
        n_embd=spec["d_in"],
        n_head=spec["n_heads"],
        n_positions=spec["n_ctx"],
        vocab_size=spec["vocab"],
        bos_token_id=spec["vocab"] - 1,
        eos_token_id=spec["vocab"] - 1,
    )
    torch.manual_seed(spec["seed"])
    GPT2LMHeadModel(config).save_pretrained(folder)


REUSE_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
"""glibc's environment spelling of what `sae_lens.cpu_memory.reuse_freed_memory` sets with mallopt;
`--reference-allocator reuse` gives it to the reference for a like-for-like comparison."""


def worker_env(threads: int, reference: bool, reuse_allocator: bool = False) -> dict[str, str]:
    """The environment of a worker: thread counts pinned; for the reference, our checkout is
    taken off PYTHONPATH (its `sae_lens` would shadow the reference's), and with `reuse_allocator`
    glibc keeps freed memory as our trainer has it do."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    if reuse_allocator:
        env.update(REUSE_ALLOCATOR_ENV)
    if reference and env.get("PYTHONPATH"):
        kept = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return env


def run_one(command: list[str], spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one worker process; its result dict, or one with `error` describing the failure."""
    label = {key: spec.get(key) for key in ("impl", "kind", "arch")}
    result = harness.run_worker_process(command, spec, env, timeout)
    return {**label, **result} if "error" in result else result


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    """Median of `key` over the successful results, or None."""
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


class Driver:
    """Schedules the workers, collects their results and prints the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.base_spec: dict[str, Any] = {
            **WORKLOAD,
            "batch_tokens": args.batch_tokens,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "reference_sparse_topk": args.reference_sparse_topk,
        }

    def spec(self, kind: str, arch: str = "-", **extra: Any) -> dict[str, Any]:
        return {**self.base_spec, "kind": kind, "arch": arch, **extra}

    def run(self, impl: str, spec: dict[str, Any]) -> None:
        """Measure `spec` with `impl` ("ours" or "reference") and record the result."""
        if impl == "ours":
            command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        else:
            command = [self.args.reference_python, str(BENCH_DIR / "reference_worker.py")]
        reference = impl == "reference"
        env = worker_env(
            self.args.threads,
            reference,
            reuse_allocator=reference and self.args.reference_allocator == "reuse",
        )
        result = run_one(command, spec, env, self.args.timeout)
        result.setdefault("impl", impl)
        self.results.append(result)
        shown = (
            f"{result['tokens_per_s']:.0f} tok/s, peak +{result['peak_mb']:.0f} MB"
            if "tokens_per_s" in result
            else result.get("skipped") or result.get("error", "").splitlines()[0]
        )
        print(f"  {impl:9s} {spec['kind']:10s} {spec['arch']:22s} {shown}", file=sys.stderr, flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr)

    def architectures(self) -> list[str]:
        """The requested architectures that ours has registered; the rest get a note."""
        from sae_lens.saes import registered_architectures

        registered = registered_architectures()
        wanted = self.args.archs or registered
        for arch in wanted:
            if arch not in registered:
                self.notes.append(
                    f"{arch}: not registered in our sae_lens ({', '.join(registered)}); skipped"
                )
        return [arch for arch in wanted if arch in registered]

    def collect(self, model_dir: str) -> None:
        """Every measurement, `--repeats` times, ours and reference interleaved."""
        archs = self.architectures()
        with_reference = self.args.reference_python is not None
        for _ in range(self.args.repeats):
            for arch in archs:
                for setting in self.args.settings:
                    spec = self.spec(setting, arch, model_dir=model_dir)
                    self.run("ours", spec)
                    if with_reference:
                        self.run("reference", spec)
            if self.args.no_limits:
                continue
            self.run("ours", self.spec("enc_matmul"))
            if "e2e" in self.args.settings:
                self.run("ours", self.spec("hf_fwd", model_dir=model_dir))
                self.run("ours", self.spec("model_fwd", model_dir=model_dir))
                if with_reference:
                    self.run("reference", self.spec("model_fwd"))

    def select(self, impl: str, kind: str, arch: str = "-") -> list[dict[str, Any]]:
        return [
            r for r in self.results if (r.get("impl"), r.get("kind"), r.get("arch")) == (impl, kind, arch)
        ]

    def limits(self) -> dict[str, float]:
        """Median tokens/s of each limit measurement, plus the combined end-to-end limit."""
        limits: dict[str, float] = {}
        for (impl, kind), label in LIMIT_LABELS.items():
            value = median_of(self.select(impl, kind), "tokens_per_s")
            if value is not None:
                limits[label] = value
        enc = limits.get(LIMIT_LABELS["ours", "enc_matmul"])
        fwd = limits.get(LIMIT_LABELS["ours", "hf_fwd"])
        if enc and fwd:
            limits["end-to-end limit: encoder matmul + raw HF forward"] = 1 / (1 / enc + 1 / fwd)
        return limits

    def summary(self) -> list[dict[str, Any]]:
        """One row per architecture and setting: medians over repeats, ratios, targets."""
        limits = self.limits()
        limit_of = {
            "sae": limits.get(LIMIT_LABELS["ours", "enc_matmul"]),
            "e2e": limits.get("end-to-end limit: encoder matmul + raw HF forward"),
        }
        rows = []
        for arch in self.architectures():
            for setting in self.args.settings:
                ours, ref = self.select("ours", setting, arch), self.select("reference", setting, arch)
                row: dict[str, Any] = {
                    "arch": arch,
                    "setting": setting,
                    "ours_tok_s": median_of(ours, "tokens_per_s"),
                    "ref_tok_s": median_of(ref, "tokens_per_s"),
                    "ours_peak_mb": median_of(ours, "peak_mb"),
                    "ref_peak_mb": median_of(ref, "peak_mb"),
                    "target": TARGETS.get((arch, setting)),
                }
                if row["ours_tok_s"] and row["ref_tok_s"]:
                    row["ratio"] = row["ours_tok_s"] / row["ref_tok_s"]
                if row["ours_tok_s"] and limit_of[setting]:
                    row["of_limit"] = row["ours_tok_s"] / limit_of[setting]
                for r in ours + ref:
                    if "skipped" in r or "error" in r:
                        reason = r.get("skipped") or r["error"].splitlines()[0]
                        self.notes.append(f"{arch}/{setting} ({r['impl']}): {reason}")
                rows.append(row)
        return rows

    def print_report(self, rows: list[dict[str, Any]]) -> None:
        args = self.args
        versions = {}
        for r in self.results:
            if "torch" in r:
                versions[r["impl"]] = f"sae_lens {r['sae_lens']}, transformer_lens {r['transformer_lens']}"
        print(
            f"\nworkload: d_in {WORKLOAD['d_in']}, d_sae {WORKLOAD['d_in'] * WORKLOAD['expansion']}, "
            f"k {WORKLOAD['k']}, {args.batch_tokens} tokens/step, {args.dtype}, {args.device}, "
            f"{args.threads} threads; {args.warmup} warm-up + {args.steps} timed steps, "
            f"median; {args.repeats} repeat(s)"
        )
        for impl, version in versions.items():
            print(f"{impl}: {version}")
        if args.reference_python and args.device == "cpu":
            print(
                "allocator: ours keeps freed memory for reuse (sae_lens.cpu_memory); reference: "
                + ("the same, via MALLOC_* env" if args.reference_allocator == "reuse" else "glibc defaults")
            )
        header = (
            f"{'arch':22s} {'setting':7s} {'ours tok/s':>10s} {'ref tok/s':>10s} {'ratio':>6s} "
            f"{'target':>7s} {'ours MB':>8s} {'ref MB':>8s} {'mem ok':>6s} {'of limit':>8s}"
        )
        print("\n" + header + "\n" + "-" * len(header))
        for row in rows:
            mem_ok = ""
            if row["ours_peak_mb"] is not None and row["ref_peak_mb"] is not None:
                mem_ok = "yes" if row["ours_peak_mb"] <= row["ref_peak_mb"] else "NO"
            target = ""
            if row["target"] is not None and "ratio" in row:
                target = f"{row['target']:.1f}x " + ("ok" if row["ratio"] >= row["target"] else "NO")
            print(
                f"{row['arch']:22s} {row['setting']:7s} {_fmt(row['ours_tok_s'], '.0f'):>10s} "
                f"{_fmt(row['ref_tok_s'], '.0f'):>10s} {_fmt(row.get('ratio'), '.2f'):>6s} {target:>7s} "
                f"{_fmt(row['ours_peak_mb'], '.0f'):>8s} {_fmt(row['ref_peak_mb'], '.0f'):>8s} "
                f"{mem_ok:>6s} {_fmt(row.get('of_limit'), '.0%'):>8s}"
            )
        limits = self.limits()
        if limits:
            print("\nlimits (tokens/s, forward only)")
            for label, value in limits.items():
                print(f"  {label:55s} {value:10.0f}")
        print(
            "\nratio = ours / reference tokens/s; MB = peak memory above the ready state "
            "(data, model, SAE built); of limit = ours / limit tokens/s"
        )
        for note in dict.fromkeys(self.notes):
            print(f"note: {note}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", help="architectures (default: every registered one)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--reference-python", help="python of a venv with sae-lens 6.x; adds ratios")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads per worker")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per measurement")
    parser.add_argument("--batch-tokens", type=int, default=WORKLOAD["batch_tokens"])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps (smoke test)")
    parser.add_argument("--no-limits", action="store_true", help="skip the limit measurements")
    parser.add_argument(
        "--reference-sparse-topk",
        action="store_true",
        help="turn on the reference TopK's use_sparse_activations (off by default, as in its config)",
    )
    parser.add_argument(
        "--reference-allocator",
        choices=("default", "reuse"),
        default="default",
        help="'reuse' runs the reference with glibc keeping freed memory, as our CPU trainer does",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--json", help="write the raw results and the summary to this file")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
    if args.batch_tokens % WORKLOAD["context"]:
        parser.error(f"--batch-tokens must be a multiple of the context size {WORKLOAD['context']}")
    if args.device.startswith("cuda") and args.worker is None and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    driver = Driver(args)
    with tempfile.TemporaryDirectory(prefix="bench_training_model_") as model_dir:
        if "e2e" in args.settings:
            make_model_folder(Path(model_dir), driver.base_spec)
        driver.collect(model_dir)
    rows = driver.summary()
    driver.print_report(rows)
    if args.json:
        payload = {
            "args": vars(args),
            "workload": WORKLOAD,
            "summary": rows,
            "limits": driver.limits(),
            "notes": list(dict.fromkeys(driver.notes)),
            "results": driver.results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
