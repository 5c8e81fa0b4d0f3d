"""`sae-lens cache`: write a model's activations at one or more hooks to disk, to train from later
(`sae-lens train --use_cached_activations true --cached_activations_path PATH`).

Every field of `CacheActivationsRunnerConfig` is a flag (`--hook_points blocks.2.hook_resid_post,
blocks.3.hook_resid_post`); `--config` reads them from YAML. Running the same command again resumes
an interrupted cache from its last complete shard. `--verify` checks an existing cache instead: every
file's size and sha256, and that it matches `--model_name` / `--hook_points` / `--dtype` when given.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from sae_lens.cli._common import quiet_libraries
from sae_lens.cli.train import add_field_flag
from sae_lens.config_fields import field_default, field_docs
from sae_lens.errors import SAELensError

COMMAND = "cache"
HELP = "write a model's activations to disk (sharded safetensors) to train SAEs from"
DESCRIPTION = (
    "Cache activations at one or more hooks. Each flag sets the config field of the same name; "
    "rerunning the same command resumes an interrupted cache."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cache` flags: one per config field."""
    from sae_lens.cached_activations import CacheActivationsRunnerConfig

    parser.add_argument("--config", help="YAML file of config fields; flags override it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the cache at --cached_activations_path (sizes, checksums, and the model/hooks/dtype given) instead of writing",
    )
    docs = field_docs(CacheActivationsRunnerConfig)
    for f in fields(CacheActivationsRunnerConfig):
        default = field_default(f)
        shown = ",".join(default) if isinstance(default, list) else default
        add_field_flag(parser, f.name, f.type, f"{docs.get(f.name, '')} (default: {shown})")


def _given_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key.removeprefix("field__"): value
        for key, value in vars(args).items()
        if key.startswith("field__") and value is not None
    }


def config_from_args(args: argparse.Namespace) -> Any:
    """The `CacheActivationsRunnerConfig` from `--config` (if any) with the flags on top."""
    from sae_lens.cached_activations import CacheActivationsRunnerConfig

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SAELensError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SAELensError(
                f"config file {str(path)!r} is not valid YAML: {str(error).splitlines()[0]}"
            ) from None
        if not isinstance(loaded, dict):
            raise SAELensError(f"config file {str(path)!r} must hold a mapping of field: value")
        values.update(loaded)
    values.update(_given_fields(args))
    return CacheActivationsRunnerConfig.from_dict(values)


def _verify(args: argparse.Namespace) -> int:
    from sae_lens.cached_activations import CacheActivationsRunnerConfig, check_cache_matches, verify_cache

    given = _given_fields(args)
    if "cached_activations_path" not in given:
        raise SAELensError("--verify needs --cached_activations_path (the cache to check)")
    # Only what was asked is compared; the flags are converted as the config would convert them.
    wanted = CacheActivationsRunnerConfig.from_dict(given)
    path = given["cached_activations_path"]
    manifest = verify_cache(path)
    check_cache_matches(
        manifest,
        model_name=wanted.model_name if "model_name" in given else None,
        hooks=wanted.hook_points if "hook_points" in given else None,
        dtype=wanted.dtype if "dtype" in given else None,
        path=path,
    )
    state = "complete" if manifest["complete"] else "incomplete (rerun sae-lens cache to finish it)"
    hooks = ", ".join(f"{hook} ({width})" for hook, width in manifest["hook_widths"].items())
    print(
        f"{path}: {manifest['n_tokens']:,} tokens of {manifest['model_name']} {hooks}, "
        f"{len(manifest['shards'])} shards, {manifest['dtype']}; every checksum matches; {state}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Write (or resume, or with --verify check) the cache. Returns the exit code."""
    if args.verify:
        return _verify(args)
    cfg = config_from_args(args)
    from sae_lens.cached_activations import cache_activations_runner

    quiet_libraries()
    print(
        f"Caching {cfg.total_training_tokens:,} tokens of {cfg.model_name} {', '.join(cfg.hook_points)} "
        f"from {cfg.dataset_path} to {cfg.cached_activations_path}",
        flush=True,
    )
    started = time.perf_counter()
    manifest = cache_activations_runner(cfg, show_progress=not args.quiet)
    seconds = time.perf_counter() - started
    note = " (the dataset ended first)" if manifest["dataset_exhausted"] else ""
    print(
        f"Cached {manifest['n_tokens']:,} tokens{note} in {len(manifest['shards'])} shards "
        f"({seconds:.0f} s) to {cfg.cached_activations_path}/"
    )
    return 0
