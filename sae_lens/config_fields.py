"""Declaring config options once: a default, a check, and the docstring under the field.

Every config dataclass of the library (an architecture's `SAEConfig`, the `TrainerConfig`, the runner
config) declares an option as

    k: int = option(32, positive_int)
    \"\"\"Active latents per token.\"\"\"

`validate_fields` runs the checks, `coerce_field` turns YAML / command-line strings into the field's
type, and `field_docs` reads the docstrings for `--help` and the generated configuration page. Nothing
here knows any particular option.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from sae_lens.errors import SAELensError

Check = Callable[[str, Any], None]
"""`check(name, value)` raises SAELensError naming the field when `value` is not acceptable."""


def option(default: Any = None, check: Check | None = None, *, default_factory: Any = None) -> Any:
    """A dataclass field with a default and an optional check (run by `validate_fields`)."""
    metadata = {"check": check} if check is not None else {}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate_fields(config: Any, names: Iterable[str] | None = None) -> None:
    """Run the check of every field of dataclass instance `config` (or only of `names`)."""
    wanted = None if names is None else set(names)
    for field in dataclasses.fields(config):
        check = field.metadata.get("check")
        if check is not None and (wanted is None or field.name in wanted):
            check(field.name, getattr(config, field.name))


# -- checks ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise SAELensError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise SAELensError(f"{name} must be a non-negative integer, got {value!r}")


def positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SAELensError(f"{name} must be positive, got {value!r}")


def non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise SAELensError(f"{name} must be non-negative, got {value!r}")


def unit_interval(name: str, value: Any) -> None:
    """0 <= value < 1 (Adam's betas)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise SAELensError(f"{name} must be in [0, 1), got {value!r}")


def optional(check: Check) -> Check:
    """`check`, or unset (None)."""

    def check_optional(name: str, value: Any) -> None:
        if value is None:
            return
        try:
            check(name, value)
        except SAELensError as error:
            raise SAELensError(f"{error} (or unset)") from None

    return check_optional


def one_of(*choices: str) -> Check:
    """One of the given strings."""

    def check_choice(name: str, value: Any) -> None:
        if value not in choices:
            raise SAELensError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    return check_choice


def finite_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SAELensError(f"{name} must be a finite number, got {value!r}")


# -- names, types and documentation ---------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each option `cls` accepts.

    A class with `extra_field_types()` (the runner config, which also takes every architecture's
    options) adds those to its own fields.
    """
    types_ = _own_field_types(cls)
    extra = getattr(cls, "extra_field_types", None)
    return {**extra(), **types_} if extra is not None else dict(types_)


@functools.lru_cache(maxsize=64)
def _own_field_types(cls: type) -> dict[str, Any]:
    # Resolving annotations is slow (it evaluates every string annotation): once per class.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_known_fields(cls: type, values: dict[str, Any]) -> None:
    """Raise SAELensError for a key `cls` does not accept, suggesting the closest one."""
    names = list(field_types(cls))
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SAELensError(f"unknown config key {key!r}{hint}")


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """Convert `value` (from YAML or the command line) to option `name`'s type, or explain why not."""
    annotation = field_types(cls)[name]
    allowed = _unwrap_optional(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in typing.get_args(annotation):
            return None
        # "none" is a real value of some str fields (normalize_activations), not an empty one.
        if value is None or allowed is not str:
            raise SAELensError(f"{name} cannot be empty")
    try:
        if allowed is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if allowed is int:
            number = float(value) if isinstance(value, str) else value  # "1e6" ok; "1.5" not 1
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if allowed is float:
            return float(value)
        if allowed is str:
            return str(value)
        if typing.get_origin(allowed) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [int(item) for item in items]
        if typing.get_origin(allowed) in (typing.Union, types.UnionType) and isinstance(value, str):
            return _number_or_word(typing.get_args(allowed), value)
    except (TypeError, ValueError, OverflowError):
        type_name = getattr(allowed, "__name__", str(allowed))
        raise SAELensError(f"{name} must be a {type_name}, got {value!r}") from None
    return value


def _number_or_word(choices: tuple[Any, ...], text: str) -> Any:
    """A command-line string for a field such as `lr: float | str` ("1e-3" or "auto") or
    `int | float` ("200" or "0.2"): the first number type it parses as, else the word itself."""
    try:
        number: float | None = float(text)
    except ValueError:
        number = None
    if number is not None:
        if int in choices and number.is_integer() and "." not in text and "e" not in text.lower():
            return int(number)
        if float in choices:
            return number
    if str in choices:
        return text
    raise ValueError(text)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    if typing.get_origin(annotation) is Literal:
        return str
    return annotation


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), read from the source of `cls`
    and of the dataclasses it inherits from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (defined in exec, or a compiled module): no docs
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(field: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its factory)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


__all__ = [
    "check_known_fields",
    "coerce_field",
    "field_default",
    "field_docs",
    "field_types",
    "non_negative",
    "non_negative_int",
    "one_of",
    "option",
    "optional",
    "positive",
    "positive_int",
    "unit_interval",
    "validate_fields",
]
