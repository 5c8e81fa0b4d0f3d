"""The dtype table (sae_lens/dtypes.py): the names configs accept and their torch dtypes."""

from __future__ import annotations

import pytest
import torch

from sae_lens.dtypes import DTYPES, dtype_name, torch_dtype
from sae_lens.errors import SAELensError


def test_the_table() -> None:
    assert {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    } == DTYPES


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_spelling_gives_the_dtype_and_back(name: str) -> None:
    dtype = DTYPES[name]
    assert torch_dtype(name) is dtype
    assert torch_dtype(f"torch.{name}") is dtype  # as str(torch.float32) and old cfg.json files write it
    assert torch_dtype(dtype) is dtype
    assert dtype_name(dtype) == name
    assert torch_dtype(dtype_name(dtype)) is dtype


@pytest.mark.parametrize("bad", ["int8", "float", "torch.int64", "", "Float32"])
def test_unknown_names_list_the_accepted_ones(bad: str) -> None:
    with pytest.raises(SAELensError) as info:
        torch_dtype(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert all(name in message for name in DTYPES)
    assert "\n" not in message


def test_configs_accept_exactly_the_table() -> None:
    from tests.conftest import make_runner_config, make_sae_config

    for name in DTYPES:
        assert make_sae_config("standard", 4, 8, dtype=name).dtype == name
        assert make_runner_config(dtype=name, model_dtype=name).dtype == name
    with pytest.raises(SAELensError, match="dtype"):
        make_sae_config("standard", 4, 8, dtype="int8")
    with pytest.raises(SAELensError, match="model_dtype"):
        make_runner_config(model_dtype="int8")
