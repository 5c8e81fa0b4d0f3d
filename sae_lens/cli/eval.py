"""`sae-lens eval SAE [SAE_ID]`: every metric of an SAE, as JSON (see docs/metrics.md).

The model, hook, dataset and context size come from the SAE's metadata unless a flag overrides
them. By default it evaluates the rows the trainer held out: the first `n_eval_sequences` packed
rows of the dataset (read from the run's `training_config.yaml` beside the SAE, 32 without one).
Every bad input (a missing SAE, a model that does not fit it, an empty dataset, an output path that
cannot be written) is found before the work starts and reported in one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from sae_lens.cli._common import quiet_libraries
from sae_lens.errors import SAELensError
from sae_lens.models import load_model

COMMAND = "eval"
HELP = "evaluate an SAE: CE/KL, explained variance, shrinkage, sparsity, per-latent statistics (JSON)"
DESCRIPTION = (
    "Evaluate an SAE on its model and dataset (from its metadata unless overridden) and print "
    "or write the metrics as JSON. Special tokens are excluded from every metric."
)
DEFAULT_HELD_OUT_ROWS = 32
"""`LanguageModelSAERunnerConfig.n_eval_sequences`'s default, for SAEs without a training_config.yaml."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eval` arguments."""
    parser.add_argument(
        "sae", metavar="SAE", help="an SAE folder, a registry release, or a Hugging Face repo"
    )
    parser.add_argument("sae_id", metavar="SAE_ID", nargs="?", help="the SAE within a release or repo")
    source = parser.add_argument_group("model and data (default: the SAE's metadata)")
    source.add_argument("--model", help="model name or folder (metadata model_name)")
    source.add_argument("--dataset", help="dataset path or builtin:NAME (metadata dataset_path)")
    source.add_argument("--hook", help="hook the SAE reads (metadata hook_name)")
    source.add_argument(
        "--context-size", type=_positive, metavar="N", help="tokens per packed row (metadata context_size)"
    )
    amount = parser.add_argument_group("how much")
    amount.add_argument(
        "--n-tokens",
        type=_positive,
        metavar="N",
        help="tokens to read (rows x context); default: the held-out rows",
    )
    amount.add_argument(
        "--n-batches", type=_positive, metavar="N", help="batches of --batch-size rows to read"
    )
    amount.add_argument(
        "--batch-size", type=_positive, metavar="N", default=8, help="rows per forward pass (default: 8)"
    )
    amount.add_argument(
        "--held-out-rows",
        type=_positive,
        metavar="N",
        help="leading dataset rows held out from training (default: n_eval_sequences of the run's "
        f"training_config.yaml, else {DEFAULT_HELD_OUT_ROWS})",
    )
    metrics = parser.add_argument_group("metrics (all on unless switched off)")
    metrics.add_argument(
        "--no-ce-kl",
        "--no-downstream",
        dest="ce_kl",
        action="store_false",
        help="skip the spliced forward passes (CE/KL, or the embedding cosine of encoder models)",
    )
    metrics.add_argument(
        "--no-reconstruction", dest="reconstruction", action="store_false", help="skip reconstruction_quality"
    )
    metrics.add_argument("--no-shrinkage", dest="shrinkage", action="store_false", help="skip shrinkage")
    metrics.add_argument("--no-sparsity", dest="sparsity", action="store_false", help="skip sparsity")
    metrics.add_argument(
        "--no-feature-metrics",
        dest="feature_metrics",
        action="store_false",
        help="skip the per-latent section (density, activations, weight norms)",
    )
    metrics.add_argument(
        "--include-special-tokens",
        action="store_true",
        help="keep BOS/EOS/CLS/SEP positions in the metrics (padding stays out)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model and SAE (default: cpu)")
    parser.add_argument("--output", help="JSON file to write (default: print the JSON on stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def eval_config_from_args(args: argparse.Namespace) -> Any:
    """The `EvalConfig` the flags describe."""
    from sae_lens.eval_runner import EvalConfig

    return EvalConfig(
        n_eval_tokens=args.n_tokens,
        n_eval_batches=args.n_batches,
        batch_size=args.batch_size,
        exclude_special_tokens=not args.include_special_tokens,
        compute_ce_kl=args.ce_kl,
        compute_reconstruction=args.reconstruction,
        compute_shrinkage=args.shrinkage,
        compute_sparsity=args.sparsity,
        compute_feature_metrics=args.feature_metrics,
        show_progress=not args.quiet,
    )


def check_output_path(output: str) -> Path:
    """The output path, or a SAELensError when a file cannot be written there (checked by creating
    and removing a temporary file beside it, so no work is done for a result that cannot be saved)."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise SAELensError(f"--output {output!r} is a folder; give a file path such as {output}/eval.json")
    if not path.parent.is_dir():
        raise SAELensError(
            f"--output {output!r}: folder {str(path.parent)!r} does not exist; create it first"
        )
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise SAELensError(f"--output {output!r} cannot be written ({error.strerror})") from None
    return path


def _load_sae(name: str, sae_id: str | None, device: str) -> Any:
    from sae_lens.pretrained import load_sae

    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        raise SAELensError(f"SAE folder {name!r} does not exist; pass an SAE folder, release or repo")
    return load_sae(name, sae_id, device=device)


def held_out_rows(name: str, sae_id: str | None) -> int:
    """`n_eval_sequences` of the run's `training_config.yaml` beside a local SAE, else the default."""
    folder = Path(name).expanduser()
    candidates = [folder / sae_id, folder] if sae_id else [folder]
    for candidate in candidates:
        config = candidate / "training_config.yaml"
        if config.is_file():
            try:
                loaded = yaml.safe_load(config.read_text()) or {}
            except yaml.YAMLError:
                break
            value = loaded.get("n_eval_sequences") if isinstance(loaded, dict) else None
            if isinstance(value, int) and value > 0:
                return value
            break
    return DEFAULT_HELD_OUT_ROWS


def run(args: argparse.Namespace) -> int:
    """Evaluate, then print or write the JSON. Returns the exit code."""
    # Checked before anything is imported or loaded: a result that cannot be saved is not computed.
    output = check_output_path(args.output) if args.output else None
    from sae_lens.atomic_files import atomic_write_text
    from sae_lens.eval_runner import HookPlan, eval_store, run_evals
    from sae_lens.models import validate_hook_point

    quiet_libraries()
    cfg = eval_config_from_args(args)
    sae = _load_sae(args.sae, args.sae_id, args.device)
    plan = HookPlan.of(sae, args.hook)
    model_name = args.model or sae.cfg.metadata.get("model_name")
    if not model_name:
        raise SAELensError("the SAE's metadata names no model_name; pass the model (--model)")
    model = load_model(model_name, device=args.device)
    for hook in dict.fromkeys((plan.read_hook, plan.write_hook)):
        validate_hook_point(model, hook)
    store = eval_store(
        model,
        sae,
        dataset_path=args.dataset,
        hook_name=args.hook,
        context_size=args.context_size,
        n_held_out_rows=args.held_out_rows or held_out_rows(args.sae, args.sae_id),
        batch_size=args.batch_size,
        device=args.device,
    )
    result = run_evals(sae, model, store, cfg, hook_name=args.hook)
    report = {
        "sae": {
            "source": args.sae,
            "sae_id": args.sae_id,
            "architecture": sae.cfg.architecture,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "d_out": sae.cfg.output_width,
            "hook_name": plan.read_hook,
            "hook_name_out": plan.write_hook if plan.is_transcoder else None,
            "hook_head_index": plan.head_index,
        },
        "model": model_name,
        "dataset": args.dataset or sae.cfg.metadata.get("dataset_path"),
        "context_size": store.context_size,
        "eval_config": {key: value for key, value in vars(cfg).items() if key != "show_progress"},
        **result.to_dict(),
    }
    text = json.dumps(report, indent=2)
    if output is None:
        print(text)
        return 0
    atomic_write_text(output, text + "\n")
    _print_summary(report, output)
    return 0


def _print_summary(report: dict[str, Any], output: Path) -> None:
    """A few lines on stdout: every scalar metric by group, then where the JSON went."""
    for group, values in report["metrics"].items():
        print(group)
        for name, value in values.items():
            shown = "n/a" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
            print(f"  {name:<38} {shown}")
    speed = report["speed"]["tokens_per_second"]
    print(f"speed {speed:,.0f} tokens/s" if speed is not None else "speed n/a")
    print(f"wrote {output}", file=sys.stdout)
