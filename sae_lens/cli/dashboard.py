"""`sae-lens dashboard SAE [SAE_ID]`: feature dashboards from one pass of the model over a corpus.

The model, hook, context size and dataset come from the SAE's metadata; each can be overridden.
Everything that can be checked before the pass is: the output path, the SAE, the feature range, the
model's hook and width, and that the dataset yields at least one row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sae_lens.cli._common import quiet_libraries
from sae_lens.errors import SAELensError

COMMAND = "dashboard"
HELP = "feature dashboards (one offline HTML file, or Neuronpedia batch files)"
DESCRIPTION = (
    "Collect every requested feature's statistics in one pass of the model over a corpus and write "
    "them as one self-contained HTML page (or Neuronpedia's batch-N.json files)."
)
DEFAULT_N_TOKENS = 2048 * 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dashboard` arguments."""
    parser.add_argument("sae", metavar="SAE", help="SAE folder, registry release, or Hugging Face repo")
    parser.add_argument("sae_id", metavar="SAE_ID", nargs="?", help="SAE id within the release or folder")
    add_source_flags(parser)
    parser.add_argument(
        "--features",
        default="all",
        help="'all', a range START:STOP (0:200), or a list 3,17,42 (default: all)",
    )
    parser.add_argument("--out", default="dashboard.html", help="output file (html) or folder (neuronpedia)")
    parser.add_argument("--format", choices=("html", "neuronpedia"), default="html", help="output format")
    parser.add_argument(
        "--intervals",
        choices=("quantile", "equal_width"),
        default="quantile",
        help="interval examples from true quantiles (default) or equal-width intervals",
    )
    parser.add_argument(
        "--n-tokens",
        type=int,
        default=DEFAULT_N_TOKENS,
        help=f"tokens to read (default {DEFAULT_N_TOKENS:,})",
    )
    parser.add_argument(
        "--skip-tokens",
        type=int,
        default=0,
        help="skip this many tokens of the dataset first (e.g. those trained on)",
    )
    parser.add_argument(
        "--dataset", help="dataset path (default: the SAE's metadata, else builtin:python-docs)"
    )
    parser.add_argument("--dataset-split", default="train", help="split of a hub or saved dataset")
    parser.add_argument(
        "--context-size", type=int, help="tokens per row (default: the SAE's metadata, else 128)"
    )
    parser.add_argument("--prompt", help="also show this text's top features per token (the prompt view)")
    parser.add_argument(
        "--n-correlated", type=int, default=10, help="correlated features per feature (0: skip)"
    )
    parser.add_argument(
        "--context-before", type=int, default=8, help="tokens shown before the activating token"
    )
    parser.add_argument(
        "--context-after", type=int, default=3, help="tokens shown after the activating token"
    )
    parser.add_argument("--batch-rows", type=int, default=16, help="rows per model forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample of activations")
    parser.add_argument("--title", help="page title")
    parser.add_argument("--np-model-id", help="neuronpedia: model id (default: the model name)")
    parser.add_argument("--np-sae-set", help="neuronpedia: SAE set name (default: the SAE's name)")
    parser.add_argument("--np-sae-id-suffix", help="neuronpedia: SAE id suffix")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `dashboard` and `inspect` share: what model, hook and device to run."""
    parser.add_argument("--model", help="model name or folder (default: the SAE's metadata)")
    parser.add_argument("--hook", help="hook point (default: the SAE's metadata)")
    parser.add_argument("--device", default="cpu", help="torch device for the model and the SAE")
    parser.add_argument(
        "--include-special-tokens",
        action="store_true",
        help="keep [CLS]/[SEP]/BOS/EOS/padding positions in the statistics (excluded by default)",
    )


def check_writable(path: Path, folder: bool) -> None:
    """Raise a `SAELensError` unless `path` (a file, or with `folder` a directory) can be written."""
    target = path if folder else path.parent
    if not folder and path.is_dir():
        raise SAELensError(f"cannot write --out {str(path)!r}: it is a folder; name a file such as dash.html")
    if folder and path.exists() and not path.is_dir():
        raise SAELensError(
            f"cannot write --out {str(path)!r}: it is a file; the neuronpedia format writes a folder"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".sae-lens-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SAELensError(f"cannot write --out {str(path)!r} ({reason}); choose a writable path") from None


def positive_flag(name: str, value: int, allow_zero: bool = False) -> None:
    """Raise a `SAELensError` unless the integer flag is positive (or zero, when allowed)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise SAELensError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def load_sae_checked(args: argparse.Namespace) -> tuple[Any, str]:
    """`(sae, name)` for the SAE the arguments name; a path-like name must exist (a clearer message
    than the loader's)."""
    from sae_lens.pretrained import load_sae

    if args.sae.startswith((".", "/", "~")) and not Path(args.sae).expanduser().exists():
        raise SAELensError(f"SAE folder {args.sae!r} does not exist; pass a folder holding cfg.json")
    sae = load_sae(args.sae, args.sae_id, device=args.device)
    sae.eval()
    return sae, args.sae if args.sae_id is None else f"{args.sae}/{args.sae_id}"


def load_model_for(args: argparse.Namespace, sae: Any) -> Any:
    """The model `--model` names, else the one in the SAE's metadata."""
    from sae_lens.models import load_model

    model_name = args.model or sae.cfg.metadata.get("model_name")
    if not model_name:
        raise SAELensError("the SAE's metadata names no model_name; pass --model")
    return load_model(model_name, device=args.device)


def run(args: argparse.Namespace) -> int:
    """Collect the statistics, write the page or the batch files, print a summary."""
    from sae_lens import dashboard as dash
    from sae_lens.text_datasets import detect_column, load_text_dataset

    out = Path(args.out).expanduser()
    check_writable(out, folder=args.format == "neuronpedia")
    for flag, value in (("--n-tokens", args.n_tokens), ("--batch-rows", args.batch_rows)):
        positive_flag(flag, value)
    for flag, value in (
        ("--skip-tokens", args.skip_tokens),
        ("--n-correlated", args.n_correlated),
        ("--context-before", args.context_before),
        ("--context-after", args.context_after),
    ):
        positive_flag(flag, value, allow_zero=True)
    if args.context_size is not None:
        positive_flag("--context-size", args.context_size)
    quiet_libraries()
    import torch

    torch.manual_seed(args.seed)
    sae, name = load_sae_checked(args)
    features = dash.parse_features(args.features, sae.cfg.d_sae)
    model = load_model_for(args, sae)
    config = dash.DashboardConfig(
        interval_kind=args.intervals,
        n_correlated=args.n_correlated,
        context_before=args.context_before,
        context_after=args.context_after,
        exclude_special_tokens=not args.include_special_tokens,
        neuron_correlations=args.format == "neuronpedia",
        batch_rows=args.batch_rows,
        seed=args.seed,
    )
    dataset_path = args.dataset or sae.cfg.metadata.get("dataset_path") or "builtin:python-docs"
    dataset = load_text_dataset(dataset_path, split=args.dataset_split)
    column, is_tokenized = detect_column(dataset)
    store = dash.make_store(
        model,
        sae,
        dataset,
        hook_name=args.hook,
        context_size=args.context_size,
        exclude_special_tokens=config.exclude_special_tokens,
        batch_rows=args.batch_rows,
        column=column,
        is_tokenized=is_tokenized,
    )
    dash.check_model_matches(sae, store)
    batches = dash.iter_token_batches(store, args.n_tokens, args.skip_tokens)
    first = next(batches)  # raises when the dataset yields no row, before any statistics

    def all_batches():  # type: ignore[no-untyped-def]
        yield first
        yield from batches

    hook_name = store.hook_point
    print(
        f"Dashboard of {len(features):,} features of {name} ({sae.cfg.d_sae:,} latents) on {hook_name}, "
        f"up to {args.n_tokens:,} tokens from {dataset_path}",
        file=sys.stderr,
        flush=True,
    )
    stats = collect_with_progress(sae, store, all_batches(), features, config, args.n_tokens, args.quiet)
    started = time.perf_counter()
    if args.format == "neuronpedia":
        from sae_lens.neuronpedia import write_neuronpedia_batches

        paths = write_neuronpedia_batches(
            stats,
            sae,
            model,
            out,
            model_id=args.np_model_id,
            sae_set=args.np_sae_set or Path(name).name,
            sae_id_suffix=args.np_sae_id_suffix,
            dataset=dataset_path,
            hook_name=hook_name,
        )
        size = sum(p.stat().st_size for p in paths)
        written = f"{len(paths)} batch files in {out}/"
    else:
        from sae_lens.html import write_dashboard_html

        prompt = dash.prompt_features(sae, store, args.prompt) if args.prompt else None
        data = dash.dashboard_data(
            stats, sae, model, name=name, hook_name=hook_name, title=args.title, prompt=prompt
        )
        write_dashboard_html(data, out)
        size = out.stat().st_size
        written = str(out)
    seconds = stats.seconds + time.perf_counter() - started
    print(
        f"Wrote {written}: {len(features):,} features over {stats.n_tokens:,} tokens "
        f"({'special tokens excluded' if config.exclude_special_tokens else 'special tokens included'}) "
        f"in {seconds:.1f} s ({len(features) / seconds:,.1f} features/s), "
        f"{size / 1e6:.2f} MB ({size / len(features) / 1e3:.1f} kB per feature)"
    )
    return 0


def collect_with_progress(
    sae: Any, store: Any, batches: Any, features: list[int], config: Any, n_tokens: int, quiet: bool
) -> Any:
    """`collect_feature_statistics` with a tokens/s progress bar on stderr."""
    from tqdm import tqdm

    from sae_lens.dashboard import collect_feature_statistics

    with tqdm(
        total=n_tokens, unit="tok", unit_scale=True, disable=quiet, file=sys.stderr, leave=False
    ) as bar:
        return collect_feature_statistics(sae, store, batches, features, config, progress=bar.update)
