"""`sae-lens` command line. `sae-lens train` with no arguments runs the main job: a TopK SAE on the
embedded MiniLM and corpus. Every config field is a flag (`--lr 1e-3`), generated from
`LanguageModelSAERunnerConfig` so the CLI never drifts from the Python API.

Exit codes: 0 success, 2 bad input (one line on stderr; `--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import fields
from typing import Any

from sae_lens.config import LanguageModelSAERunnerConfig, coerce_field, field_docs
from sae_lens.errors import SAELensError

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that names the closest flag for a typo, in one line, and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "unrecognized arguments" in message:
            # Unknown flags of a subcommand surface here, in the top-level parser: search the
            # subcommands' flags too, or `--lrr` would never suggest `train`'s `--lr`.
            parsers = [self] + [
                sub
                for action in self._actions
                if isinstance(action, argparse._SubParsersAction)
                for sub in action.choices.values()
            ]
            flags = [a for p in parsers for a in p._option_string_actions if a.startswith("--")]
            bad = message.split(":", 1)[1].split()[0].split("=")[0]
            close = difflib.get_close_matches(bad, flags, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            message = f"unknown config key {bad.lstrip('-')!r}{hint}"
        self.exit(USAGE_ERROR, f"sae-lens: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The `sae-lens` parser with its `train` subcommand."""
    parser = _Parser(prog="sae-lens", description="Train sparse autoencoders on language-model activations.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train an SAE (defaults: TopK k=32, 16x, on all-MiniLM-L6-v2 blocks.3.hook_resid_post)",
        description="Train an SAE. Each flag sets the config field of the same name.",
    )
    train.add_argument("--config", help="YAML file of config fields; flags override it")
    train.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    docs = field_docs(LanguageModelSAERunnerConfig)
    for f in fields(LanguageModelSAERunnerConfig):
        # A bare boolean flag (`--streaming`) means true; `--streaming false` also works.
        is_bool = "bool" in str(f.type)
        bool_options: dict[str, Any] = {"nargs": "?", "const": "true"} if is_bool else {}
        train.add_argument(
            f"--{f.name}",
            dest=f"field__{f.name}",
            metavar="VALUE",
            help=f"{docs.get(f.name, '')} (default: {f.default})",
            **bool_options,
        )
    return parser


def config_from_args(args: argparse.Namespace) -> LanguageModelSAERunnerConfig:
    """The config from `--config` (if any) with the command-line fields on top."""
    overrides: dict[str, Any] = {
        key.removeprefix("field__"): coerce_field(
            LanguageModelSAERunnerConfig, key.removeprefix("field__"), value
        )
        for key, value in vars(args).items()
        if key.startswith("field__") and value is not None
    }
    if args.config:
        return LanguageModelSAERunnerConfig.from_yaml(args.config, **overrides)
    return LanguageModelSAERunnerConfig.from_dict(overrides)


def run_train(args: argparse.Namespace) -> int:
    """Train, then print the summary. Returns the exit code."""
    import datasets
    import transformers

    from sae_lens.runner import train_sae

    # Library progress bars (weight loading, dataset saving) would sit between our own lines on
    # stderr and bury a one-line error; the CLI shows its own training progress bar instead.
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    cfg = config_from_args(args)
    print(
        f"Training a {cfg.architecture} SAE on {cfg.model_name} {cfg.hook_point} "
        f"({cfg.total_training_tokens:,} tokens from {cfg.dataset_path})",
        flush=True,
    )
    result = train_sae(cfg, show_progress=not args.quiet)
    m = result.metrics
    print("\nSummary (held-out tokens)")
    print(f"  L0                  {m.get('l0', float('nan')):.1f}")
    print(f"  explained variance  {m.get('explained_variance', float('nan')):.3f}")
    print(f"  dead fraction       {m.get('dead_fraction', float('nan')):.3f}")
    for key in ("ce_score", "kl_score", "embedding_cosine_score", "embedding_cosine_with_sae"):
        if key in m:
            print(f"  {key:<19} {m[key]:.3f}")
    print(f"  tokens trained      {result.tokens_trained:,} in {result.seconds:.0f} s")
    if result.ran_out_of_data:
        print("  note: the dataset ran out before total_training_tokens; the SAE trained so far was saved")
    print(f"  files               {result.output_dir}/ (cfg.json, sae_weights.safetensors, metrics.jsonl)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sae-lens` and `python -m sae_lens`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("SAE_LENS_DEBUG"))
    try:
        return run_train(args)
    except SAELensError as error:
        if debug:
            raise
        print(f"sae-lens: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("sae-lens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
