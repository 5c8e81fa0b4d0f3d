"""`sae-lens report OUTPUT_DIR`: write the training report (`report.html`) of a run folder."""

from __future__ import annotations

import argparse

COMMAND = "report"
HELP = "write a run folder's training report (report.html: loss curves, L0, density, final eval)"
DESCRIPTION = "Write OUTPUT_DIR/report.html from OUTPUT_DIR/metrics.jsonl: one self-contained page."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `report` argument."""
    parser.add_argument("output_dir", help="a run folder written by `sae-lens train`")


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from sae_lens.html import write_training_report

    print(write_training_report(args.output_dir))
    return 0
