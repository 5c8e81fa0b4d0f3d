"""Checkpoints: a folder holding the SAE (raw scale, loadable as it is) and everything needed to
continue training exactly where it stopped.

    step_1200/
      saes/<name>/           each SAE's folder (cfg.json, sae_weights.safetensors, sparsity.safetensors)
      training_state.pt      each SAE's TrainingState.state_dict(), RNG states, and what the caller
                             adds (the store's position)
      checkpoint.json        step, tokens, the SAEs' names, library version, the state file's SHA-256

The folder is built under a temporary name and renamed when complete, so a crash never leaves one
that looks valid. `training_state.pt` holds only tensors and plain Python values and is read with
`torch.load(weights_only=True)`; a file whose checksum does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens.atomic_files import atomic_folder
from sae_lens.errors import SAELensError

STATE_FILENAME = "training_state.pt"
MANIFEST_FILENAME = "checkpoint.json"
SAES_FOLDER = "saes"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The random states of torch (CPU and CUDA), numpy and Python, as plain values and tensors."""
    import numpy as np

    name, keys, position, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, cached],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(item) for item in value] if isinstance(value, tuple) else value


def write_checkpoint(
    path: str | Path,
    *,
    sae_writers: dict[str, Callable[[Path], Any]],
    training_states: dict[str, dict[str, Any]],
    step: int,
    tokens: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: `sae_writers[name](folder)` writes SAE `name`'s folder,
    `training_states[name]` is its `TrainingState.state_dict()`."""
    from sae_lens.version import __version__

    path = Path(path)
    with atomic_folder(path) as building:
        for name, write_sae in sae_writers.items():
            write_sae(building / SAES_FOLDER / name)
        state = {"format": FORMAT_VERSION, "trainers": training_states, "rng": rng_state(), **(extra or {})}
        torch.save(state, building / STATE_FILENAME)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "tokens": tokens,
            "saes": list(sae_writers),
            "sae_lens_version": __version__,
            "state_sha256": _sha256(building / STATE_FILENAME),
        }
        (building / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2))
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state a checkpoint folder holds, after checking it is complete and intact."""
    path = Path(path)
    manifest_file, state_file = path / MANIFEST_FILENAME, path / STATE_FILENAME
    if not path.is_dir() or not manifest_file.is_file() or not state_file.is_file():
        raise SAELensError(
            f"{str(path)!r} is not a complete checkpoint (it needs {MANIFEST_FILENAME} and {STATE_FILENAME}); "
            "pass a step_N folder written by training"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        raise SAELensError(
            f"checkpoint {str(path)!r} is corrupt: {MANIFEST_FILENAME} is not valid JSON"
        ) from None
    if manifest.get("format") != FORMAT_VERSION:
        raise SAELensError(
            f"checkpoint {str(path)!r} has format {manifest.get('format')!r}; this library reads {FORMAT_VERSION}"
        )
    if _sha256(state_file) != manifest.get("state_sha256"):
        raise SAELensError(
            f"checkpoint {str(path)!r} is corrupt: {STATE_FILENAME} does not match its checksum; "
            "resume from an earlier checkpoint"
        )
    try:
        state = torch.load(state_file, weights_only=True, map_location="cpu")
    except Exception as error:  # unpickling errors come in many types; all mean the same here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SAELensError(f"checkpoint {str(path)!r} cannot be read ({reason})") from None
    state["manifest"] = manifest
    return state


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete `step_N` checkpoint with the largest N under `folder`, or None."""
    candidates = []
    for child in Path(folder).glob("step_*"):
        suffix = child.name.removeprefix("step_")
        if suffix.isdigit() and (child / MANIFEST_FILENAME).is_file():
            candidates.append((int(suffix), child))
    return max(candidates)[1] if candidates else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
