"""What several subcommands share; no `COMMAND` here, so `sae-lens` lists no subcommand for it."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Silence the libraries' progress bars (weight loading, dataset saving): they would sit between
    our own lines on stderr and bury a one-line error; each command shows its own progress bar."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
