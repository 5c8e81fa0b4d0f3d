"""Running the custom autograd kernels under `torch.autocast`.

Autocast does not reach inside an `autograd.Function`: its forward would see float32 inputs yet
bf16 results from the autocast matmuls, and mixed dtypes break the sparse ops. So the kernels'
inputs are cast to the autocast dtype *before* the Function (a differentiable `.to`, which casts
the gradients back to the parameters' dtype) and the Function then runs with autocast off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The floating-point tensors cast to the active autocast dtype; unchanged when it is off."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast for `device`'s type inside the block."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
