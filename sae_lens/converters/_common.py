"""Small helpers the converters share (no SAE classes here either)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens.dtypes import DTYPES, dtype_name
from sae_lens.errors import SAELensError
from sae_lens.sae_files import SAEFiles


def require_tensors(state: dict[str, torch.Tensor], names: tuple[str, ...], source: Path, what: str) -> None:
    """Raise one line naming what is missing when `state` lacks any of `names`."""
    missing = [name for name in names if name not in state]
    if missing:
        raise SAELensError(
            f"{str(source)!r} is not a {what} file: it lacks {', '.join(missing)} "
            f"(it holds {', '.join(sorted(state)) or 'nothing'})"
        )


def check_widths(
    source: Path, d_in: int, d_sae: int, what: str, config: str, declared: dict[str, Any]
) -> None:
    """Raise one line unless the widths a config declares (`{key: value}`: the input width, then the
    dictionary size) are the weights' `d_in` and `d_sae`."""
    if tuple(declared.values()) != (d_in, d_sae):
        said = ", ".join(f"{key} {value}" for key, value in declared.items())
        raise SAELensError(f"{str(source)!r} holds a {d_in} x {d_sae} {what} but {config} says {said}")


def read_only_member(
    folder: Path,
    device: str | None,
    members: Callable[[Path], list[str]],
    read_member: Callable[[Path, str, str | None], SAEFiles],
    what: str,
) -> SAEFiles:
    """Read the only member of a multi-SAE `folder` (`read_sae_folder` asks for an id when there are
    several); `what` names the members in the error (`"transcoders"`)."""
    found = members(folder)
    if len(found) != 1:
        raise SAELensError(
            f"{str(folder)!r} holds {len(found)} {what}; pass an sae_id, one of: {', '.join(found)}"
        )
    return read_member(folder, found[0], device)


def weights_dtype(tensor: torch.Tensor) -> str:
    """The config dtype name of a weight tensor; float32 for dtypes our configs do not name."""
    name = dtype_name(tensor.dtype)
    return name if name in DTYPES else "float32"


def hook_layer(hook_name: str | None) -> int | None:
    """`blocks.N....` -> N (None for hooks outside the blocks, such as `hook_embed`)."""
    match = re.match(r"blocks\.(\d+)\.", hook_name or "")
    return int(match.group(1)) if match else None


def hook_metadata(hook_name: str | None, hook_name_out: str | None = None, **extra: Any) -> dict[str, Any]:
    """`metadata` entries for a hook (and a transcoder's output hook), dropping unknown (None) ones."""
    values: dict[str, Any] = {"hook_name": hook_name, "hook_layer": hook_layer(hook_name)}
    if hook_name_out is not None and hook_name_out != hook_name:
        values["hook_name_out"] = hook_name_out
    values.update(extra)
    return {key: value for key, value in values.items() if value is not None}


def non_negative_threshold(threshold: torch.Tensor, source: Path) -> torch.Tensor:
    """A JumpReLU threshold for an activation `relu(pre) * (pre > t)`, as ours (`pre * (pre > t)`,
    t >= 0) runs it.

    Exact, not an approximation: where t < 0, `relu(pre) * (pre > t)` is `relu(pre)` (a pre-activation
    in (t, 0] gives 0 either way, below t it is masked, above 0 it passes), which is ours with t = 0.
    Formats whose activation has no ReLU (`pre * (pre > t)` with t < 0 lets negative values through)
    must refuse negative thresholds instead (see `circuit_tracer`).
    """
    if threshold.isnan().any():
        raise SAELensError(f"{str(source)!r} has NaN JumpReLU thresholds")
    return threshold.clamp_min(0)
