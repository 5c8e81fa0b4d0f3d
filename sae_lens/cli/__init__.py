"""`sae-lens` command line: one module per subcommand in this package (`train`, `eval`, ...).

A subcommand module defines `COMMAND` (its name), `HELP` (its line in `sae-lens --help`),
`DESCRIPTION` (the top of its own `--help`), `add_arguments(parser)` (its flags) and
`run(args) -> int`. `sae-lens train` with no arguments runs the main job: a TopK SAE on the embedded
MiniLM and corpus.

Exit codes: 0 success, 2 bad input (one line on stderr; `--debug` shows the traceback), 130 / 143
interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import pkgutil
import sys
from types import ModuleType

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


def command_modules() -> dict[str, ModuleType]:
    """The subcommand modules of this package, by command name."""
    modules = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMMAND"):
            modules[module.COMMAND] = module
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The `sae-lens` parser with every subcommand."""
    parser = _Parser(
        prog="sae-lens", description="Train and analyse sparse autoencoders on language-model activations."
    )
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    for module in command_modules().values():
        sub = commands.add_parser(module.COMMAND, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(sub)
        sub.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def config_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """`sae-lens train`'s config from its parsed flags (see `sae_lens.cli.train`)."""
    from sae_lens.cli.train import config_from_args as train_config

    return train_config(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sae-lens` and `python -m sae_lens`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("SAE_LENS_DEBUG"))
    try:
        return command_modules()[args.command].run(args)
    except SAELensError as error:
        if debug:
            raise
        print(f"sae-lens: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("sae-lens: interrupted", file=sys.stderr)
        return 130


__all__ = ["USAGE_ERROR", "build_parser", "config_from_args", "main"]
