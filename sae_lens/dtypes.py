"""The dtype names configs accept, and the one table that maps them to torch dtypes."""

from __future__ import annotations

import torch

from sae_lens.errors import SAELensError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype named `name` (`float32`, `torch.float32` and `torch.float32` itself all work)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise SAELensError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `float32`."""
    return str(dtype).removeprefix("torch.")
