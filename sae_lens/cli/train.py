"""`sae-lens train`: train an SAE. Every config field is a flag (`--lr 1e-3`), generated from
`LanguageModelSAERunnerConfig` and the architectures' own configs, so the CLI never drifts from the
Python API. With no flags it runs the main job: TopK k=32, 16x, on all-MiniLM-L6-v2
`blocks.3.hook_resid_post`, trained on the embedded corpus.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from sae_lens.cli._common import quiet_libraries
from sae_lens.config import LanguageModelSAERunnerConfig, architecture_option_docs, is_hook_pattern
from sae_lens.config_fields import coerce_field, field_default, field_docs, field_types

COMMAND = "train"
HELP = "train an SAE (defaults: TopK k=32, 16x, on all-MiniLM-L6-v2 blocks.3.hook_resid_post)"
DESCRIPTION = "Train an SAE. Each flag sets the config field of the same name."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` flags: one per config field and architecture option."""
    parser.add_argument("--config", help="YAML file of config fields; flags override it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    docs = field_docs(LanguageModelSAERunnerConfig)
    types_ = field_types(LanguageModelSAERunnerConfig)
    for f in fields(LanguageModelSAERunnerConfig):
        if f.name != "sae_options":
            add_field_flag(
                parser, f.name, types_[f.name], f"{docs.get(f.name, '')} (default: {field_default(f)})"
            )
    # Every architecture's own options, declared in its file; an option several architectures
    # declare (l1_coefficient) gets one flag, listed under the first.
    seen: set[str] = set()
    for architecture, option_docs in architecture_option_docs().items():
        group = parser.add_argument_group(f"SAE options: {architecture}")
        for name, (text, default) in option_docs.items():
            if name not in seen:
                seen.add(name)
                add_field_flag(group, name, types_[name], f"{text} (default: {default})")


def add_field_flag(parser: Any, name: str, annotation: Any, help_text: str) -> None:
    """`--name VALUE` for config field `name`, stored as `field__name` (read back by `config_from_args`)."""
    # A bare boolean flag (`--streaming`) means true; `--streaming false` also works.
    bool_options: dict[str, Any] = {"nargs": "?", "const": "true"} if "bool" in str(annotation) else {}
    # argparse %-formats help strings: a docstring's "20%" must reach it as "20%%".
    help_text = help_text.replace("%", "%%")
    parser.add_argument(f"--{name}", dest=f"field__{name}", metavar="VALUE", help=help_text, **bool_options)


def config_from_args(args: argparse.Namespace) -> LanguageModelSAERunnerConfig:
    """The config from `--config` (if any) with the command-line fields on top.

    A comma-separated value for a single-valued field (`--k 16,32`) is a sweep. With only
    `--resume_from_checkpoint`, the config is the one the run saved in its folder.
    """
    types_ = field_types(LanguageModelSAERunnerConfig)
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("field__") or value is None:
            continue
        name = key.removeprefix("field__")
        if isinstance(value, str) and "," in value and "list" not in str(types_[name]):
            overrides[name] = [
                coerce_field(LanguageModelSAERunnerConfig, name, item) for item in value.split(",")
            ]
        else:
            overrides[name] = coerce_field(LanguageModelSAERunnerConfig, name, value)
    config_file = args.config
    if config_file is None and overrides.get("resume_from_checkpoint"):
        from sae_lens.runner import saved_run_config

        config_file = saved_run_config(overrides["resume_from_checkpoint"])
    if config_file:
        return LanguageModelSAERunnerConfig.from_yaml(config_file, **overrides)
    return LanguageModelSAERunnerConfig.from_dict(overrides)


def run(args: argparse.Namespace) -> int:
    """Train, then print each SAE's summary and write its training report. Returns the exit code."""
    from sae_lens import distributed
    from sae_lens.html import write_training_report
    from sae_lens.runner import train_saes
    from sae_lens.training.stopping import TrainingInterrupted

    quiet_libraries()
    cfg = config_from_args(args)
    n_saes = len(cfg.expand())
    what = f"{n_saes} SAEs (a sweep)" if n_saes > 1 else f"a {cfg.architecture} SAE"
    where = cfg.hook_point
    if is_hook_pattern(cfg.hook_point):
        # The pattern is matched against the model's hooks once it is loaded.
        what = f"{cfg.architecture} SAEs" if n_saes == 1 else f"{n_saes} SAEs per hook (a sweep)"
        where = f"every hook matching {cfg.hook_point}"
    print(
        f"Training {what} on {cfg.model_name} {where} "
        f"({cfg.total_training_tokens:,} tokens from {cfg.dataset_path})",
        flush=True,
    )
    try:
        results = train_saes(cfg, show_progress=not args.quiet)
    except TrainingInterrupted as stopped:
        if not distributed.is_main_process():
            return stopped.exit_code  # rank 0 reports what was saved, once
        folders = ", ".join(str(folder) for folder in stopped.sae_folders)
        saved = [f"the SAE trained so far to {folders}"] if folders else []
        if stopped.checkpoint is not None:
            saved.append(
                f"a resumable checkpoint to {stopped.checkpoint} (resume with --resume_from_checkpoint)"
            )
        print(f"\nsae-lens: {stopped}; saved {' and '.join(saved) or 'nothing'}", file=sys.stderr)
        return stopped.exit_code
    if not distributed.is_main_process() and not cfg.distribute_saes:
        return 0
    for result in results:
        _print_summary(result, write_training_report(result.output_dir))
    return 0


def _print_summary(result: Any, report: Any) -> None:
    m = result.metrics
    print(f"\nSummary (held-out tokens){f': {result.output_dir.name}' if result.output_dir else ''}")
    print(f"  L0                  {m.get('l0', float('nan')):.1f}")
    print(f"  explained variance  {m.get('explained_variance', float('nan')):.3f}")
    print(
        f"  dead fraction       {m.get('dead_fraction', float('nan')):.3f} (no firing on the held-out tokens)"
    )
    print(f"  dead in training    {result.dead_in_training:.3f} (no firing for the dead-latent window)")
    for key in ("ce_score", "kl_score", "embedding_cosine_score", "embedding_cosine_with_sae"):
        if key in m:
            print(f"  {key:<19} {m[key]:.3f}")
    print(f"  tokens trained      {result.tokens_trained:,} in {result.seconds:.0f} s")
    print(f"  learning rate       {result.lr:.3g}")
    refit = result.decoder_refit
    if refit:
        held_out = (
            f", held-out explained variance {refit['held_out_explained_variance_before']:.3f} -> "
            f"{refit['held_out_explained_variance']:.3f}"
            if "held_out_explained_variance" in refit
            else ""
        )
        print(
            f"  decoder refit       on the last {refit['tokens']:,.0f} tokens in {refit['seconds']:.1f} s{held_out}"
        )
    if result.ran_out_of_data:
        print("  note: the dataset ran out before total_training_tokens; the SAE trained so far was saved")
    for warning in result.warnings:
        print(f"  warning: {warning}")
    print(f"  files               {result.output_dir}/ (cfg.json, sae_weights.safetensors, metrics.jsonl)")
    print(f"  report              {report}")
