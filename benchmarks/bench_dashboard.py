"""Feature-dashboard speed: `sae_lens.dashboard` on every feature of the main-job SAE, and SAEDashboard
on the same SAE, tokens and model shape.

What is timed, for both: from packed token rows already in memory (and a loaded model and SAE) to a
written HTML file; loading the model, the SAE and the corpus is not timed. Threads are pinned
(`--threads`, 2 by default: the 2-core machine).

- ours: `collect_feature_statistics` (one pass of the model over all rows, every requested feature
  at once) + `dashboard_data` + `write_dashboard_html`, on the real all-MiniLM-L6-v2 bridge.
- SAEDashboard 0.8 (run in its own venv by `--reference-python`, with TransformerLens 2 and SAELens
  6.x): `SaeVisRunner(SaeVisConfig(...)).run(...)` + `save_feature_centric_vis`, defaults (256
  features per model pass, 64 prompts per forward). It cannot load our TransformerLens 4 bridge, so it
  runs a `HookedTransformer` of MiniLM's shape (6 blocks, d_model 384, 12 heads, d_mlp 1536, vocab
  30,522, bidirectional attention, LayerNorm, GELU) with random weights; the SAE is our main-job SAE
  folder, which SAELens 6 loads as it is. Same token ids, same hook (`blocks.3.hook_resid_post`),
  same special tokens ignored ([CLS], [SEP], [PAD]).

SAEDashboard re-runs the model for every batch of 256 features, so its time is `setup + n_batches x
per_batch`; it is measured at 256 and 512 features and extrapolated linearly in batches to the whole
dictionary (stated as such in the output; when load noise makes the fitted setup negative, the
conservative `n_batches x t(256)`). Ours is measured, not extrapolated. The figures are in
docs/dashboards.md.

Run (heavy: one job at a time, niced):

    nice -n 10 python benchmarks/bench_dashboard.py --sae /tmp/dashrun/main --rows 1024 \\
        --reference-python /tmp/venv-saedash/bin/python --out /tmp/bench_dashboard.json

The file is also the reference worker (`--worker reference`), which imports only SAEDashboard's stack.
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

HOOK = "blocks.3.hook_resid_post"
IGNORED_TOKEN_IDS = (0, 101, 102)  # MiniLM's [PAD], [CLS], [SEP]


def main_job_rows_read(training_config: Path) -> int:
    """Packed rows the main job's store read: the held-out eval rows, the first buffer fill, then one
    refill of half the buffer after every half served (as `ActivationsStore._iter_batches` does)."""
    import yaml

    cfg = yaml.safe_load(training_config.read_text())
    buffer_rows = cfg["n_batches_in_buffer"] * cfg["train_batch_size"] // cfg["context_size"]
    batches = cfg["total_training_tokens"] // cfg["train_batch_size"]
    per_half = cfg["n_batches_in_buffer"] // 2
    refills = batches // per_half
    return cfg["n_eval_sequences"] + buffer_rows + refills * (buffer_rows // 2)


def corpus_rows(model: Any, sae: Any, n_rows: int, skip_rows: int = 0) -> Any:
    """`[n_rows, 128]` packed rows of builtin:python-docs after `skip_rows` (fewer if it ends)."""
    import torch

    from sae_lens import dashboard as dash
    from sae_lens.text_datasets import load_text_dataset

    store = dash.make_store(model, sae, load_text_dataset("builtin:python-docs"), batch_rows=64)
    return torch.cat(list(dash.iter_token_batches(store, n_rows * 128, skip_rows * 128)))


def time_ours(
    model: Any, sae: Any, rows: Any, features: list[int] | None, repeats: int, out: Path
) -> dict[str, Any]:
    """Median seconds of each phase over `repeats` runs, and the page size."""
    import torch

    from sae_lens import dashboard as dash
    from sae_lens.html import write_dashboard_html

    store = dash.make_store(model, sae)
    phases: dict[str, list[float]] = {"pass": [], "assemble": [], "write": [], "total": [], "cpu_total": []}
    n_features = sae.cfg.d_sae if features is None else len(features)
    for _ in range(repeats):
        cpu_started = time.process_time()
        started = time.perf_counter()
        stats = dash.collect_feature_statistics(sae, store, rows.split(16), features)
        passed = time.perf_counter()
        data = dash.dashboard_data(stats, sae, model, name="main-job")
        assembled = time.perf_counter()
        write_dashboard_html(data, out)
        written = time.perf_counter()
        for name, seconds in (
            ("pass", passed - started),
            ("assemble", assembled - passed),
            ("write", written - assembled),
            ("total", written - started),
            ("cpu_total", time.process_time() - cpu_started),
        ):
            phases[name].append(seconds)
        del stats, data
    size = out.stat().st_size
    median = {name: statistics.median(values) for name, values in phases.items()}
    return {
        "features": n_features,
        "tokens": int(rows.numel()),
        "kept_tokens": int((~torch.isin(rows, torch.tensor(IGNORED_TOKEN_IDS))).sum()),
        "seconds": median,
        "runs": phases,
        "features_per_second": n_features / median["total"],
        "html_bytes": size,
        "html_bytes_per_feature": size / n_features,
    }


def run_reference(
    python: str, sae_folder: Path, tokens_file: Path, tokenizer: str, n_features: int, threads: int
) -> dict[str, Any]:
    """One SAEDashboard run in its venv (a subprocess of this file in worker mode)."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [
            python,
            __file__,
            "--worker",
            "reference",
            "--sae",
            str(sae_folder),
            "--tokens",
            str(tokens_file),
        ]
        command += ["--features", str(n_features), "--threads", str(threads), "--out", str(result_file)]
        command += ["--tokenizer", tokenizer]
        # The worker must import SAELens 6 from its venv, never this checkout (drop PYTHONPATH).
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        subprocess.run(command, check=True, cwd=scratch, env=env)
        return json.loads(result_file.read_text())


def reference_worker(args: argparse.Namespace) -> None:
    """SAEDashboard on a MiniLM-shaped HookedTransformer with random weights (its venv only)."""
    import torch
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from sae_lens import SAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = HookedTransformerConfig(
        n_layers=6, d_model=384, n_heads=12, d_head=32, d_mlp=1536, d_vocab=30522, n_ctx=512,
        act_fn="gelu", normalization_type="LN", attention_dir="bidirectional", positional_embedding_type="standard",
    )  # fmt: skip
    # MiniLM's own tokenizer: the page shows its token strings.
    model = HookedTransformer(config, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer)).eval()
    sae = SAE.load_from_disk(args.sae, device="cpu")
    # SaeVisRunner folds the decoder norms into the encoder, which SAELens 6 refuses for TopK. Our
    # decoder rows are unit norm, so folding is the identity: skip it, after checking that.
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.W_dec.shape[0]), atol=1e-4)
    sae.fold_W_dec_norm = lambda: None  # type: ignore[method-assign]
    tokens = torch.load(args.tokens, weights_only=True)
    out = Path(args.out).with_suffix(".html")
    cpu_started = time.process_time()
    started = time.perf_counter()
    cfg = SaeVisConfig(
        hook_point=HOOK,
        features=list(range(args.features)),
        ignore_tokens=set(IGNORED_TOKEN_IDS),
        verbose=False,
    )
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    collected = time.perf_counter()
    save_feature_centric_vis(data, out)
    written = time.perf_counter()
    Path(args.out).write_text(
        json.dumps(
            {
                "features": args.features,
                "tokens": int(tokens.numel()),
                "seconds": {
                    "collect": collected - started,
                    "write": written - collected,
                    "total": written - started,
                    "cpu_total": time.process_time() - cpu_started,
                },
                "html_bytes": out.stat().st_size,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sae", required=True, help="the main-job SAE folder (sae-lens train --checkpoint_path ...)"
    )
    parser.add_argument("--rows", type=int, default=1024, help="rows of 128 tokens for the comparison")
    parser.add_argument("--ours-features", default="all,512", help="feature counts timed for ours")
    parser.add_argument(
        "--reference-features", default="256,512", help="feature counts timed for SAEDashboard"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours per setting (median)")
    parser.add_argument(
        "--reference-repeats", type=int, default=1, help="runs of SAEDashboard per setting (median)"
    )
    parser.add_argument(
        "--reference-python", help="python of the SAEDashboard venv (skip the reference if unset)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--held-out",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time every feature on the held-out rows",
    )
    parser.add_argument("--out", default="bench_dashboard.json")
    parser.add_argument("--worker", choices=("reference",), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--features", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "reference":
        reference_worker(args)
        return

    import torch

    from sae_lens.models import load_model, resolve_model_path
    from sae_lens.pretrained import load_sae

    torch.set_num_threads(args.threads)
    sae_folder = Path(args.sae)
    sae = load_sae(str(sae_folder))
    model = load_model(sae.cfg.metadata["model_name"])
    tokenizer = resolve_model_path(sae.cfg.metadata["model_name"])
    results: dict[str, Any] = {"threads": args.threads, "d_sae": sae.cfg.d_sae, "ours": {}, "reference": {}}
    with tempfile.TemporaryDirectory() as scratch:
        page = Path(scratch) / "dashboard.html"
        # The comparison: --rows x 128 tokens from the start of the corpus, the same ids for both.
        rows = corpus_rows(model, sae, args.rows)
        tokens_file = Path(scratch) / "tokens.pt"
        torch.save(rows.clone(), tokens_file)
        ours_specs = args.ours_features.split(",")
        reference_specs = args.reference_features.split(",") if args.reference_python else []
        # Interleaved (ours, reference, ours, ...) so that a drift in the machine's load hits both.
        for i in range(max(len(ours_specs), len(reference_specs))):
            if i < len(ours_specs):
                spec = ours_specs[i]
                features = None if spec == "all" else list(range(int(spec)))
                results["ours"][spec] = time_ours(model, sae, rows, features, args.repeats, page)
                print(f"ours, {spec} features:", json.dumps(results["ours"][spec]["seconds"]), flush=True)
            if i < len(reference_specs):
                spec = reference_specs[i]
                runs = [
                    run_reference(
                        args.reference_python, sae_folder, tokens_file, tokenizer, int(spec), args.threads
                    )
                    for _ in range(args.reference_repeats)
                ]
                results["reference"][spec] = {
                    "features": int(spec),
                    "tokens": runs[0]["tokens"],
                    "html_bytes": runs[0]["html_bytes"],
                    "html_bytes_per_feature": runs[0]["html_bytes"] / int(spec),
                    "seconds": {
                        key: statistics.median(r["seconds"][key] for r in runs) for key in runs[0]["seconds"]
                    },
                    "runs": runs,
                }
                print(
                    f"SAEDashboard, {spec} features:",
                    json.dumps(results["reference"][spec]["seconds"]),
                    flush=True,
                )
        if args.held_out:
            # Every feature over the held-out corpus: the rows of builtin:python-docs the main job never read.
            skip = main_job_rows_read(sae_folder / "training_config.yaml")
            held_out = corpus_rows(model, sae, 100_000, skip_rows=skip)
            results["held_out"] = {
                "skipped_rows": skip,
                **time_ours(model, sae, held_out, None, args.repeats, page),
            }
            print("held-out corpus, every feature:", json.dumps(results["held_out"]["seconds"]), flush=True)
    reference = results["reference"]
    if {"256", "512"} <= reference.keys():
        extrapolated: dict[str, Any] = {}
        for clock in ("total", "cpu_total"):
            per_batch = reference["512"]["seconds"][clock] - reference["256"]["seconds"][clock]
            setup = reference["256"]["seconds"][clock] - per_batch
            if setup < 0:  # load noise: fall back to the conservative n_batches x t(256)
                setup, per_batch = 0.0, reference["256"]["seconds"][clock]
            whole = setup + -(-sae.cfg.d_sae // 256) * per_batch
            ours_all = results["ours"].get("all", {}).get("seconds", {}).get(clock)
            ours_512 = results["ours"].get("512", {}).get("seconds", {}).get(clock)
            extrapolated[clock] = {
                "reference_seconds_per_256_features": per_batch,
                "reference_setup_seconds": setup,
                "reference_seconds_all_features": whole,
                "reference_features_per_second_all": sae.cfg.d_sae / whole,
                "ours_seconds_all_features": ours_all,
                "ours_features_per_second_all": sae.cfg.d_sae / ours_all if ours_all else None,
                "speedup_all": whole / ours_all if ours_all else None,
                "speedup_512_measured": reference["512"]["seconds"][clock] / ours_512 if ours_512 else None,
            }
        results["extrapolated"] = extrapolated
        print("extrapolated:", json.dumps(extrapolated), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
