"""Config fields declared once (sae_lens/config_fields.py): `option` and its checks, coercion of YAML and
command-line strings, unknown-key suggestions, and docstrings read from the source (inherited too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from sae_lens.config_fields import (
    check_known_fields,
    coerce_field,
    field_default,
    field_docs,
    field_types,
    finite_float,
    non_negative,
    non_negative_int,
    one_of,
    option,
    optional,
    positive,
    positive_int,
    unit_interval,
    validate_fields,
)
from sae_lens.errors import SAELensError


@dataclass
class Base:
    """A config with one option of each kind."""

    width: int = option(4, positive_int)
    """How wide."""
    rate: float = option(0.5, unit_interval)
    """A rate
    spread over two lines."""
    mode: str = option("a", one_of("a", "b"))
    """Which mode."""
    limit: int | None = option(None, optional(positive_int))
    """Unset means no limit."""
    flag: bool = False
    """A switch."""
    name: str = "none"
    undocumented: float = 1.0
    widths: list[int] | None = option(None)
    """Several widths."""
    style: Literal["x", "y"] = "x"
    tags: dict[str, Any] = option(default_factory=dict)
    """Free-form."""


@dataclass
class Child(Base):
    """Adds an option and re-documents one."""

    depth: int = option(2, non_negative_int)
    """How deep."""
    rate: float = option(0.25, unit_interval)
    """The child's own rate."""


class WithExtra(Base):
    """A class whose accepted keys include some that are not its fields (like the runner config)."""

    @classmethod
    def extra_field_types(cls) -> dict[str, Any]:
        return {"k": int, "coefficient": float}


# -- option and validate_fields -----------------------------------------------------------------------


def test_option_declares_a_default_and_a_check() -> None:
    fields = {f.name: f for f in dataclasses.fields(Base)}
    assert fields["width"].default == 4 and fields["width"].metadata["check"] is positive_int
    assert "check" not in fields["flag"].metadata
    assert field_default(fields["tags"]) == {} and field_default(fields["width"]) == 4
    a, b = Base(), Base()
    assert a.tags == {} and a.tags is not b.tags  # a factory, not one shared dict


def test_validate_fields_runs_every_check_or_only_the_named_ones() -> None:
    validate_fields(Base())
    bad = Base(width=0, mode="c")
    with pytest.raises(SAELensError, match="width must be a positive integer, got 0"):
        validate_fields(bad)
    with pytest.raises(SAELensError, match="mode must be one of a, b; got 'c'"):
        validate_fields(bad, names=["mode"])
    validate_fields(bad, names=["rate"])  # width and mode are not checked


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (positive_int, [1, 10**12], [0, -1, 1.0, True, "3", None]),
        (non_negative_int, [0, 5], [-1, 0.5, False]),
        (positive, [1, 1e-9, 2.5], [0, -1e-9, True, "1", float("nan")]),
        (non_negative, [0, 0.0, 3], [-1e-9, float("nan"), None]),
        (unit_interval, [0, 0.5, 0.999], [1, 1.0, -0.1, True]),
        (finite_float, [0, -3.5, 1e300], [float("inf"), float("nan"), "1", False]),
        (one_of("x", "y"), ["x", "y"], ["z", None, 1]),
        (optional(positive_int), [None, 3], [0, "none"]),
    ],
)
def test_checks_accept_and_reject(check: Any, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        check("field", value)
    for value in bad:
        with pytest.raises(SAELensError, match="field") as info:
            check("field", value)
        assert "\n" not in str(info.value)


def test_optional_says_unset_is_allowed() -> None:
    with pytest.raises(SAELensError, match=r"must be a positive integer, got 0 \(or unset\)"):
        optional(positive_int)("limit", 0)


# -- names and types ----------------------------------------------------------------------------------


def test_field_types_resolve_annotations_and_add_extra_keys() -> None:
    types_ = field_types(Base)
    assert types_["width"] is int and types_["limit"] == int | None and types_["flag"] is bool
    extra = field_types(WithExtra)
    assert extra["k"] is int and extra["coefficient"] is float and extra["width"] is int


def test_check_known_fields_suggests_the_closest_name() -> None:
    check_known_fields(Base, {"width": 1, "rate": 0.1})
    with pytest.raises(SAELensError, match="unknown config key 'widht'; did you mean 'width'"):
        check_known_fields(Base, {"widht": 1})
    with pytest.raises(SAELensError, match="did you mean 'coefficient'"):
        check_known_fields(WithExtra, {"coeficient": 1})  # the extra keys count as known
    with pytest.raises(SAELensError, match="'zzzz'") as info:
        check_known_fields(Base, {"zzzz": 1})
    assert "did you mean" not in str(info.value)


# -- coerce_field -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("width", "12", 12),
        ("width", "1e3", 1000),
        ("width", 7.0, 7),
        ("rate", "0.25", 0.25),
        ("rate", 1, 1.0),
        ("flag", "true", True),
        ("flag", "Yes", True),
        ("flag", "on", True),
        ("flag", "0", False),
        ("flag", "off", False),
        ("flag", False, False),
        ("limit", "none", None),
        ("limit", "NULL", None),
        ("limit", None, None),
        ("limit", "5", 5),
        ("name", "none", "none"),  # a real value of a str field, not an empty one
        ("name", 12, "12"),
        ("widths", "4,16,64", [4, 16, 64]),
        ("widths", [4, "16"], [4, 16]),
        ("style", "y", "y"),
    ],
)
def test_coerce_field_converts_to_the_declared_type(name: str, value: Any, expected: Any) -> None:
    got = coerce_field(Base, name, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("width", "1.5", "width must be a int, got '1.5'"),
        ("width", 2.5, "width must be a int"),
        ("width", "inf", "width must be a int"),
        ("width", "none", "width cannot be empty"),
        ("width", None, "width cannot be empty"),
        ("rate", "fast", "rate must be a float, got 'fast'"),
        ("flag", "maybe", "flag must be a bool, got 'maybe'"),
        ("widths", "4,x", "widths must be a"),
    ],
)
def test_coerce_field_rejects_with_the_field_name(name: str, value: Any, fragment: str) -> None:
    with pytest.raises(SAELensError) as info:
        coerce_field(Base, name, value)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_coerce_field_uses_extra_field_types() -> None:
    assert coerce_field(WithExtra, "k", "16") == 16
    assert coerce_field(WithExtra, "coefficient", "1e-2") == pytest.approx(0.01)


# -- field_docs ---------------------------------------------------------------------------------------


def test_field_docs_reads_the_string_under_each_field() -> None:
    docs = field_docs(Base)
    assert docs["width"] == "How wide."
    assert docs["rate"] == "A rate spread over two lines."  # whitespace collapsed
    assert docs["tags"] == "Free-form."
    assert "name" not in docs and "undocumented" not in docs and "style" not in docs


def test_field_docs_include_inherited_ones_and_overrides_win() -> None:
    docs = field_docs(Child)
    assert docs["width"] == "How wide." and docs["mode"] == "Which mode."  # from Base
    assert docs["depth"] == "How deep."
    assert docs["rate"] == "The child's own rate."
    # A plain subclass (not a dataclass itself) has its bases' docs.
    assert field_docs(WithExtra) == field_docs(Base)


def test_field_docs_of_the_real_configs_cover_their_options() -> None:
    from sae_lens.saes import BatchTopKSAEConfig
    from sae_lens.training.config import TrainerConfig

    docs = field_docs(BatchTopKSAEConfig)
    # Its own option, TopK's (inherited) and the base SAEConfig's.
    for name in ("topk_threshold_lr", "k", "aux_k", "aux_k_coefficient", "d_in", "apply_b_dec_to_input"):
        assert docs.get(name), name
    trainer_docs = field_docs(TrainerConfig)
    assert all(trainer_docs.get(f.name) for f in dataclasses.fields(TrainerConfig))


def test_field_types_resolves_the_annotations_once_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving string annotations costs ~2 ms per class; once per field (and per key coerced) it
    made `LanguageModelSAERunnerConfig.from_yaml` take seconds."""
    import typing

    real = typing.get_type_hints
    calls: list[Any] = []

    def counting(obj: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(typing, "get_type_hints", counting)

    @dataclass
    class Fresh:
        a: int = 1
        b: float = 2.0
        c: str = "x"
        d: bool = False

    assert field_types(Fresh) == {"a": int, "b": float, "c": str, "d": bool}
    assert len(calls) <= 1, f"get_type_hints ran {len(calls)} times for one class of 4 fields"
