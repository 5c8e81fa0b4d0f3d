"""`sae-lens list [PATTERN]`: the pretrained-SAE registry as a table.

Without a pattern: one line per release (model, architecture, number of SAEs, widths, repo). With
one: every SAE whose release or id matches it (a glob such as `gemma-scope-2b-pt-res*`, or a
case-insensitive substring such as `resid_post`), with its model, hook, width and L0. `--all`
lists every SAE.
"""

from __future__ import annotations

import argparse
import sys

from sae_lens.errors import SAELensError

COMMAND = "list"
HELP = "list the pretrained SAE releases, or the SAEs matching PATTERN"
DESCRIPTION = (
    "List the pretrained SAE registry: releases, or with PATTERN (glob or substring of a "
    "release or SAE id) each matching SAE with its model, hook, width and L0."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `list` arguments."""
    parser.add_argument("pattern", metavar="PATTERN", nargs="?", help="glob or substring of release / sae_id")
    parser.add_argument("--all", action="store_true", help="list every SAE, not one line per release")


def run(args: argparse.Namespace) -> int:
    """Print the table; exit code 2 when nothing matches."""
    from sae_lens.hub import list_pretrained_saes, pretrained_saes_table

    if args.pattern is not None and not list_pretrained_saes(args.pattern):
        raise SAELensError(
            f"no pretrained SAE release or id matches {args.pattern!r}; `sae-lens list` shows the releases"
        )
    summary = args.pattern is None and not args.all
    print(pretrained_saes_table(args.pattern, summary=summary))
    if summary:
        print(
            "\n`sae-lens list PATTERN` lists the SAEs (ids, hooks, widths, L0) of matching releases.",
            file=sys.stderr,
        )
    return 0
