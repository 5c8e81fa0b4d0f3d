"""What every encoder kernel does to its inputs first: validate them, cast them for autocast, and
size the chunks of its forward pass.

Autocast does not reach inside an `autograd.Function`: its forward would see float32 inputs yet
bf16 results from the autocast matmuls, and mixed dtypes break the sparse ops. So the kernels'
inputs are cast to the autocast dtype *before* the Function (a differentiable `.to`, which casts
the gradients back to the parameters' dtype) and the Function then runs with autocast off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sae_lens.errors import SAELensError

# Element budget of one [rows, d_sae] pre-activation chunk of an encoder forward. On CPU a
# cache-sized chunk (16 MiB in float32) was fastest; on accelerators a larger one keeps the
# matmul efficient while still bounding the transient memory.
_CHUNK_ELEMS_CPU = 1 << 22
_CHUNK_ELEMS_ACCEL = 1 << 27


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


def check_encoder_inputs(
    sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, chunk_rows: int | None
) -> None:
    """Shapes and dtypes of a sparse encoder's inputs, with errors naming the mismatch."""
    if sae_in.ndim != 2:
        raise SAELensError(f"sae_in must be [n_tokens, d_in], got shape {tuple(sae_in.shape)}")
    d_in, d_sae = W_enc.shape
    if sae_in.shape[-1] != d_in:
        raise SAELensError(f"sae_in last dim {sae_in.shape[-1]} != W_enc rows {d_in}")
    if b_enc.shape != (d_sae,):
        raise SAELensError(f"b_enc shape {tuple(b_enc.shape)} != ({d_sae},)")
    if sae_in.dtype != W_enc.dtype:
        # The kernels' matmuls write into preallocated buffers, which autocast does not reach.
        raise SAELensError(f"sae_in dtype {sae_in.dtype} != W_enc dtype {W_enc.dtype}; cast one of them")
    if not 1 <= k <= d_sae:
        raise SAELensError(f"k must be in [1, {d_sae}], got {k}")
    if chunk_rows is not None and chunk_rows < 1:
        raise SAELensError(f"chunk_rows must be positive, got {chunk_rows}")


def rows_per_chunk(chunk_rows: int | None, n_tokens: int, d_sae: int, device: torch.device) -> int:
    """Tokens per `addmm` chunk of an encoder forward: `chunk_rows`, or a bounded default."""
    if chunk_rows is None:
        budget = _CHUNK_ELEMS_CPU if device.type == "cpu" else _CHUNK_ELEMS_ACCEL
        chunk_rows = max(1, budget // d_sae)
    return min(chunk_rows, max(1, n_tokens))
