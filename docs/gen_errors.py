"""Regenerate docs/errors.md: every error a user can cause, with its message, read from the source.

python docs/gen_errors.py

The package is scanned with `ast` (nothing is imported): every call of `SAELensError` or of one of
its subclasses (`TrainingDiverged`, ...) becomes a row giving the module, the function it is raised
in, the message template (the f-string's literal text with its `{...}` placeholders kept) and the
exit code of `sae-lens` when the CLI meets it. The signal exit codes come from
`SIGNAL_EXIT_CODES` in `sae_lens/training/stopping.py`. A test compares the committed page with
`render()`, so the page cannot fall behind the code.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "sae_lens"
OUTPUT = Path(__file__).resolve().parent / "errors.md"
BASE_ERROR = "SAELensError"

HEADER = """# Errors

Every problem a user can cause (a bad value, a missing file, a model that cannot take the input, a
run that diverged) is raised as `sae_lens.errors.SAELensError`, a `ValueError`, with one line that
names the problem and the fix. From Python you catch it as `SAELensError` (or `ValueError`); the
command line prints it as `sae-lens: error: <message>` on stderr, with no traceback, and exits with
code {usage}. `--debug` (or `SAE_LENS_DEBUG=1`) shows the traceback instead.

Exit codes of `sae-lens`:

| code | meaning |
|---|---|
| 0 | success |
| {usage} | a user error: one of the messages below (or an unknown flag) |
{signal_rows}

In the messages, `{{...}}` stands for a value filled in when the error is raised (the expression in
the source is shown). This page is generated from the source by `python docs/gen_errors.py`.
"""

SIGNALS = """
## Interrupted runs

`Ctrl-C` (SIGINT) or `kill` (SIGTERM) lets the step in progress finish, writes a resumable
checkpoint and the SAE trained so far, and exits with the shell's code for the signal:

```
sae-lens: interrupted by SIGINT after step 812; saved the SAE trained so far to checkpoints/run and a resumable checkpoint to checkpoints/run/checkpoints/step_812 (resume with --resume_from_checkpoint)
```

A second signal during that save stops at once (`sae-lens: interrupted`, code {second}); files are
written atomically, so it leaves no half-written one. See [Scale and robustness](scale.md).

## Command-line flags

| where | message | exit code |
|---|---|---|
{flag_rows}
"""


@dataclass(frozen=True)
class ErrorSite:
    """One place that raises a user error."""

    module: str
    where: str
    error: str
    message: str


def _template(node: ast.expr | None) -> str:
    """The message an argument builds, with `{expression}` for every computed part."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_placeholder(part) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return f"{{{ast.unparse(node)}}}"


def _placeholder(part: ast.expr) -> str:
    """One part of an f-string as written in the source: text, or `{expression!conversion:spec}`."""
    if isinstance(part, ast.Constant):
        return str(part.value)
    assert isinstance(part, ast.FormattedValue)
    conversion = f"!{chr(part.conversion)}" if part.conversion != -1 else ""
    spec = f":{_template(part.format_spec)}" if part.format_spec is not None else ""
    return f"{{{ast.unparse(part.value)}{conversion}{spec}}}"


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _error_classes(trees: dict[str, ast.Module]) -> set[str]:
    """SAELensError and every class of the package derived from it (directly or not)."""
    names = {BASE_ERROR}
    grew = True
    while grew:
        grew = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names:
                    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                    if bases & names:
                        names.add(node.name)
                        grew = True
    return names


class _Finder(ast.NodeVisitor):
    """Collects the error calls of one module with the qualified name of the enclosing function."""

    def __init__(self, module: str, errors: set[str]) -> None:
        self.module, self.errors = module, errors
        self.scope: list[str] = []
        self.sites: list[ErrorSite] = []

    def _scoped(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def visit_Call(self, node: ast.Call) -> None:
        name = _called_name(node)
        if name in self.errors:
            message = _template(node.args[0] if node.args else None)
            where = ".".join(self.scope) or "(module)"
            self.sites.append(ErrorSite(self.module, where, name, message))
        self.generic_visit(node)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse_package() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def find_error_sites() -> list[ErrorSite]:
    """Every user-error call in the package, in module order, then source order."""
    trees = _parse_package()
    errors = _error_classes(trees)
    sites: list[ErrorSite] = []
    for module, tree in trees.items():
        finder = _Finder(module, errors)
        finder.visit(tree)
        # Subclass definitions are not raises; an empty call (a bare `SAELensError()`) says nothing.
        sites += [site for site in finder.sites if site.message]
    return list(dict.fromkeys(sites))  # the same message raised twice in one function is one row


def _signal_codes(trees: dict[str, ast.Module]) -> dict[str, int]:
    """`SIGNAL_EXIT_CODES` of sae_lens.training.stopping, read from its source: {"SIGINT": 130, ...}."""
    for node in ast.walk(trees["sae_lens.training.stopping"]):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "SIGNAL_EXIT_CODES":
            value = node.value  # type: ignore[attr-defined]
            return {
                key.attr: item.value  # type: ignore[union-attr]
                for key, item in zip(value.keys, value.values, strict=True)
            }
    raise RuntimeError("SIGNAL_EXIT_CODES not found in sae_lens/training/stopping.py")


def _constant(tree: ast.Module, name: str) -> int:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return int(node.value.value)  # type: ignore[attr-defined]
    raise RuntimeError(f"{name} not found")


def _flag_messages(tree: ast.Module) -> list[tuple[str, str]]:
    """The messages the CLI's argument parser builds itself (`_Parser.error`)."""
    rows = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "_Parser":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Assign) and getattr(inner.targets[0], "id", None) == "message":
                    rows.append((f"sae_lens.cli `{node.name}.error`", _template(inner.value)))
    return rows


def _cell(text: str) -> str:
    """A table cell holding `text` as code: pipes escaped, backticks swapped for quotes."""
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def render() -> str:
    """The whole page."""
    trees = _parse_package()
    usage = _constant(trees["sae_lens.cli"], "USAGE_ERROR")
    codes = _signal_codes(trees)
    signal_rows = "\n".join(
        f"| {code} | interrupted by {name} (after saving; see below) |" for name, code in codes.items()
    )
    lines = [HEADER.format(usage=usage, signal_rows=signal_rows)]
    sites = find_error_sites()
    modules = list(dict.fromkeys(site.module for site in sites))
    lines.append(f"{len(sites)} messages in {len(modules)} modules.\n")
    for module in modules:
        lines += [f"## `{module}`", "", "| where | error | message | exit code |", "|---|---|---|---|"]
        for site in (s for s in sites if s.module == module):
            lines.append(f"| `{site.where}` | `{site.error}` | {_cell(site.message)} | {usage} |")
        lines.append("")
    flag_rows = "\n".join(
        f"| {where} | {_cell(message)} | {usage} |"
        for where, message in _flag_messages(trees["sae_lens.cli"])
    )
    lines.append(SIGNALS.format(second=codes.get("SIGINT", 130), flag_rows=flag_rows).rstrip() + "\n")
    return "\n".join(lines)


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
