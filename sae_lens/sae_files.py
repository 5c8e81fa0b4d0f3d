"""Reading and writing SAE folders: our format (SAELens 6.x's), and every other format a converter
registers.

A folder is read in two steps. A *format* turns the files into plain data in our layout: a config
dict in SAELens 6.x's shape (`architecture`, `d_in`, `d_sae`, the architecture's options, and
`metadata` holding `hook_name`, `model_name`, ...) and a state dict with our parameter names and
orientation (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`, ...). `SparseAutoencoder.load_from_disk`
then builds the SAE from that data. Formats register themselves with `register_format`: the one
defined here reads SAELens folders (6.x and before 6.0), which is also what we write; the others live
in `sae_lens.converters`, one file each, imported the first time a folder is read.

Some folders hold several SAEs: a sparsify run (one sub-folder per hookpoint), a sweep (one
sub-folder per trainer), a hook-z release (one `.pt` file per layer), a circuit-tracer transcoder set
(one `layer_N.safetensors` per layer). `read_sae_folder(folder, sae_id=...)` picks one; without an
id such a folder is an error that lists what it holds.

This module knows no SAE class, so the SAE classes can call it without an import cycle.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_lens.atomic_files import atomic_save_safetensors, atomic_write_text
from sae_lens.errors import SAELensError

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"


@dataclass
class SAEFiles:
    """What a format read from a folder, in our layout."""

    config: dict[str, Any]
    """SAELens-6.x-shaped config: architecture, d_in, d_sae, options, metadata."""
    state_dict: dict[str, torch.Tensor]
    """Parameters and buffers under our names and in our orientation."""
    log_feature_sparsity: torch.Tensor | None = None
    """log10 feature densities `[d_sae]`, when the folder has them."""


@dataclass(frozen=True)
class HubLayout:
    """Where one SAE of a format lies in a Hugging Face repo, given its path there.

    `folder` is what the format's reader is handed once the files are downloaded (relative to the
    repo root); `member` names the SAE inside it when the folder holds several as files (hook-z
    `.pt` files, circuit-tracer layers)."""

    folder: str
    required: tuple[str, ...]
    """Files (relative to the repo root) without which the SAE cannot be read."""
    optional: tuple[str, ...] = ()
    """Files read when present (sparsity, a run's config.json)."""
    member: str | None = None


@dataclass(frozen=True)
class SAEFormat:
    """A registered folder format."""

    name: str
    detect: Callable[[Path], bool]
    """Whether a folder holds this format (looks at file names only; cheap)."""
    read: Callable[[Path, str | None], SAEFiles]
    """`read(folder, device)`."""
    priority: int
    """Formats are tried in ascending priority; broad ones (a bare cfg.json) go last."""
    members: Callable[[Path], list[str]] | None = None
    """For formats whose folder holds several SAEs as files: their ids (`sae_id`s)."""
    read_member: Callable[[Path, str, str | None], SAEFiles] | None = None
    """`read_member(folder, sae_id, device)` for those formats."""
    hub_layout: Callable[[str], HubLayout | None] | None = None
    """The files one SAE at a repo path needs (None when the path cannot be this format)."""


_FORMATS: dict[str, SAEFormat] = {}


def register_format(
    name: str,
    detect: Callable[[Path], bool],
    read: Callable[[Path, str | None], SAEFiles],
    priority: int = 50,
    *,
    members: Callable[[Path], list[str]] | None = None,
    read_member: Callable[[Path, str, str | None], SAEFiles] | None = None,
    hub_layout: Callable[[str], HubLayout | None] | None = None,
) -> None:
    """Make `read_sae_folder` understand another library's folders (see `SAEFormat`)."""
    _FORMATS[name] = SAEFormat(name, detect, read, priority, members, read_member, hub_layout)


def _load_converters() -> None:
    # The converters import this module to register themselves, so they are imported here, on
    # first use, rather than at the top (which would be an import cycle).
    importlib.import_module("sae_lens.converters")


def registered_formats() -> list[str]:
    """Names of the formats `read_sae_folder` understands, in detection order."""
    _load_converters()
    return [f.name for f in sorted(_FORMATS.values(), key=lambda f: f.priority)]


def get_format(name: str) -> SAEFormat:
    """The format registered under `name`, or a SAELensError listing the known names."""
    _load_converters()
    if name not in _FORMATS:
        raise SAELensError(f"unknown SAE format {name!r}; known formats: {', '.join(registered_formats())}")
    return _FORMATS[name]


def detect_format(folder: Path) -> SAEFormat | None:
    """The first registered format (by priority) whose files are in `folder`, or None."""
    for name in registered_formats():
        if _FORMATS[name].detect(folder):
            return _FORMATS[name]
    return None


def safe_relative_path(path: str, what: str = "path") -> str:
    """`path` as a POSIX path relative to a root it cannot leave; refuses `..`, absolute paths,
    home (`~`) and drive prefixes and backslashes, with one clear line."""
    text = str(path)
    parts = PurePosixPath(text).parts
    if (
        not text
        or text.startswith(("/", "~"))
        or "\\" in text
        or re.match(r"[A-Za-z]:", text)
        or any(part == ".." for part in parts)
    ):
        raise SAELensError(
            f"{what} {text!r} is not a relative path inside the folder or repo (no '..', no absolute path)"
        )
    return "/".join(part for part in parts if part != ".")


def repo_path(*parts: str) -> str:
    """Join repo-relative path parts with `/`, skipping empty ones (`repo_path("", "cfg.json")` is
    `cfg.json`: an SAE at the repo's root)."""
    return "/".join(part.strip("/") for part in parts if part and part.strip("/"))


def sae_folder_contents(folder: str | Path) -> list[str]:
    """The ids of the SAEs a folder holds: its SAE sub-folders (a sparsify run, a sweep, a folder
    of SAE folders), or the SAE files of a multi-SAE format (hook-z, circuit-tracer layers).

    Empty when the folder is itself one SAE (or holds none)."""
    path = Path(folder)
    sae_format = detect_format(path)
    if sae_format is not None:
        return sae_format.members(path) if sae_format.members is not None else []
    if not path.is_dir():
        return []
    return sorted(
        child.name for child in path.iterdir() if child.is_dir() and detect_format(child) is not None
    )


def read_sae_folder(
    folder: str | Path,
    device: str | None = None,
    format_name: str | None = None,
    sae_id: str | None = None,
) -> SAEFiles:
    """Read the SAE in `folder`, in whichever registered format it is (or in `format_name`).

    `sae_id` picks one SAE of a folder that holds several: a sub-folder (`layers.3`,
    `resid_post_layer_3/trainer_0`) or, for multi-SAE formats, a member (`layer_3`).
    """
    path = Path(folder)
    if not path.is_dir():
        raise SAELensError(f"{str(path)!r} is not an SAE folder: it does not exist or is not a folder")
    if sae_id is not None:
        relative = safe_relative_path(sae_id, "sae_id")
        if (path / relative).is_dir():
            return read_sae_folder(path / relative, device, format_name)
        return _read_member(path, relative, device, format_name)
    sae_format = get_format(format_name) if format_name is not None else detect_format(path)
    if sae_format is not None:
        if sae_format.members is not None and sae_format.read_member is not None:
            members = sae_format.members(path)
            if len(members) == 1:
                return sae_format.read_member(path, members[0], device)
            if len(members) > 1:
                raise _several_saes_error(path, members)
        return sae_format.read(path, device)
    members = sae_folder_contents(path)
    if len(members) == 1:
        return read_sae_folder(path / members[0], device)
    if members:
        raise _several_saes_error(path, members)
    present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise SAELensError(
        f"{str(path)!r} is not an SAE folder: {SAE_CFG_FILENAME} is missing and no other known format "
        f"({', '.join(registered_formats())}) matches; it holds: {present}"
    )


def _read_member(path: Path, sae_id: str, device: str | None, format_name: str | None) -> SAEFiles:
    sae_format = get_format(format_name) if format_name is not None else detect_format(path)
    members = sae_folder_contents(path)
    # `layer_3` names the member `layer_3.safetensors`, `x` the member `x.pt`.
    by_stem = [member for member in members if PurePosixPath(member).stem == sae_id]
    if sae_id not in members and len(by_stem) == 1:
        sae_id = by_stem[0]
    if (
        sae_format is not None
        and sae_format.members is not None
        and sae_format.read_member is not None
        and sae_id in members
    ):
        return sae_format.read_member(path, sae_id, device)
    raise SAELensError(
        f"{str(path)!r} holds no SAE {sae_id!r}{_closest(sae_id, members)}"
        + (f"; it holds: {_listing(members)}" if members else "")
    )


def _several_saes_error(path: Path, members: list[str]) -> SAELensError:
    return SAELensError(
        f"{str(path)!r} holds {len(members)} SAEs; pass an sae_id, one of: {_listing(members)}"
    )


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _closest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f" (closest: {', '.join(close)})" if close else ""


def write_sae_folder(
    folder: str | Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    log_feature_sparsity: torch.Tensor | None = None,
) -> Path:
    """Write `cfg.json`, `sae_weights.safetensors` and, when given, `sparsity.safetensors` into
    `folder`, each file atomically. Returns the folder."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state_dict, path / SAE_WEIGHTS_FILENAME)
    if log_feature_sparsity is not None:
        atomic_save_safetensors({"sparsity": log_feature_sparsity}, path / SPARSITY_FILENAME)
    # Written last: a folder whose cfg.json exists has its weights complete.
    atomic_write_text(path / SAE_CFG_FILENAME, json.dumps(config, indent=2))
    return path


# -- safe readers ---------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_safetensors(path: Path, device: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a corrupt or truncated file into a one-line error.

    Tensors are read straight into memory they own (on `device`), once: no second copy of the
    weights is made while loading, and nothing is left mapped to the file.
    """
    if not path.is_file():
        raise SAELensError(f"{str(path)!r} does not exist; an SAE folder needs {path.name}")
    try:
        try:
            return load_file(str(path), device=device or "cpu", backend="pread")
        except TypeError:  # safetensors < 0.8 has no backend option (and always reads into memory)
            return load_file(str(path), device=device or "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SAELensError(
            f"{str(path)!r} is corrupt or truncated ({_first_line(error)}); re-save or re-download it"
        ) from None


def read_torch_file(path: Path, device: str | None = None) -> dict[str, torch.Tensor]:
    """Read a `.pt` state dict with `torch.load(weights_only=True)`: tensors and plain containers
    only, never arbitrary pickled objects."""
    import pickle

    if not path.is_file():
        raise SAELensError(f"{str(path)!r} does not exist")
    try:
        value = torch.load(path, map_location=device or "cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise SAELensError(
            f"{str(path)!r} holds more than tensors ({_first_line(error)}); only weights_only=True "
            "files are loaded, re-save it as a plain state dict"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise SAELensError(f"{str(path)!r} is corrupt or truncated ({_first_line(error)})") from None
    if not isinstance(value, dict) or not all(isinstance(t, torch.Tensor) for t in value.values()):
        raise SAELensError(f"{str(path)!r} is not a state dict (a mapping of names to tensors)")
    return value


def read_npz(path: Path, device: str | None = None) -> dict[str, torch.Tensor]:
    """Read a NumPy `.npz` of arrays with `allow_pickle=False` (no pickled objects)."""
    import zipfile

    import numpy as np

    if not path.is_file():
        raise SAELensError(f"{str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            # from_numpy shares the array's memory: no second copy.
            tensors = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise SAELensError(f"{str(path)!r} is not a readable .npz of arrays ({_first_line(error)})") from None
    return {name: tensor.to(device) for name, tensor in tensors.items()} if device else tensors


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, with one-line errors."""
    if not path.is_file():
        raise SAELensError(f"{str(path)!r} does not exist")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else _first_line(error)
        raise SAELensError(f"{str(path)!r} is not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise SAELensError(f"{str(path)!r} must hold a JSON object")
    return value


# -- the SAELens format (ours) ------------------------------------------------------------------------

SOURCE_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "exclude_special_tokens",
)
"""The `metadata` entries that say what an SAE reads (model, hook, context, data). A pre-6.0 `cfg.json`
and a registry entry's `config_overrides` give them beside the architecture's options."""
_METADATA_KEYS = (
    *SOURCE_METADATA_KEYS,
    "model_class_name",
    "neuronpedia_id",
    "model_from_pretrained_kwargs",
    "hook_name_out",
    "hook_layer_out",
)
_LEGACY_METADATA_KEYS = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
}


def saelens_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A `cfg.json` of any SAELens version in the 6.x shape our configs read.

    - 6.x: `architecture`, `d_in`, `d_sae`, architecture options (`k`, ...) and `metadata` (or
      `meta`) holding `hook_name`, `model_name`, `context_size`, ...
    - before 6.0: a flat dict with `hook_point`/`hook_name`, `activation_fn_str` (`relu`/`topk`)
      and `activation_fn_kwargs` (`{"k": K}`), sometimes `expansion_factor` instead of `d_sae`.
    """
    raw = dict(raw)
    if looks_like_sparsify_config(raw):
        raise SAELensError(
            "this cfg.json is an EleutherAI sparsify config (num_latents, k, multi_topk), not a SAELens "
            "one; its folder loads with the sparsify format (weights in sae.safetensors)"
        )
    metadata: dict[str, Any] = dict(raw.pop("metadata", None) or raw.pop("meta", None) or {})
    for key in _METADATA_KEYS:
        if key in raw and key not in metadata:
            metadata[key] = raw[key]
    for old, new in _LEGACY_METADATA_KEYS.items():
        if old in raw and new not in metadata:
            metadata[new] = raw[old]
    if "d_in" not in raw:
        raise SAELensError("cfg.json has no d_in; it is not an SAE config")
    architecture = raw.get("architecture")
    if architecture is None or architecture == "standard":
        # Before 6.0 a TopK SAE was a "standard" one whose activation function was topk.
        activation = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
        architecture = "topk" if activation == "topk" else "standard"
    if raw.get("k") is None and (raw.get("activation_fn_kwargs") or {}).get("k") is not None:
        raw["k"] = raw["activation_fn_kwargs"]["k"]
    if raw.get("d_sae") is None and raw.get("expansion_factor") is not None:
        raw["d_sae"] = int(raw["d_in"] * raw["expansion_factor"])
    if raw.get("d_sae") is None:
        raise SAELensError("cfg.json has neither d_sae nor expansion_factor")
    normalize = raw.get("normalize_activations") or "none"
    if normalize not in ("none", "expected_average_only_in"):
        raise SAELensError(
            f"cfg.json uses normalize_activations={normalize!r}, which this library cannot run yet"
        )
    if raw.get("rescale_acts_by_decoder_norm") and architecture != "topk":
        raise SAELensError(
            "cfg.json sets rescale_acts_by_decoder_norm, which this library cannot run yet; "
            "fold the decoder norms into the encoder before saving"
        )
    raw.pop("activation_fn_kwargs", None)
    return {
        **raw,
        "architecture": architecture,
        "dtype": str(raw.get("dtype", "float32")),
        "metadata": metadata,
    }


def scale_rows_and_columns(
    tensor: torch.Tensor,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """`tensor * factor * rows[:, None] * columns[None, :]` (1-D tensors: `* factor * columns`),
    computed in float64 and rounded once to the tensor's dtype, so a fold adds no rounding of its
    own beyond the file's dtype.

    Works in place, a block of rows at a time: converters fold weights they just read, and a
    float64 copy of a whole `[d_in, d_sae]` matrix would double the memory of loading it.
    """
    out = tensor if tensor.is_contiguous() else tensor.contiguous()
    if out.ndim == 1:
        scale = torch.full_like(out, factor, dtype=torch.float64)
        if columns is not None:
            scale = scale * columns.to(out.device, torch.float64)
        out.copy_((out.double() * scale).to(out.dtype))
        return out
    column_scale = columns.to(out.device, torch.float64) if columns is not None else None
    row_scale = rows.to(out.device, torch.float64) if rows is not None else None
    block = max(1, (1 << 22) // max(1, out.shape[1]))
    for start in range(0, out.shape[0], block):
        part = out[start : start + block]
        scaled = part.double() * factor
        if row_scale is not None:
            scaled = scaled * row_scale[start : start + block, None]
        if column_scale is not None:
            scaled = scaled * column_scale
        part.copy_(scaled.to(out.dtype))
    return out


SPARSIFY_CONFIG_KEYS = ("num_latents", "multi_topk", "transcode")


def looks_like_sparsify_config(raw: dict[str, Any]) -> bool:
    """Whether a cfg.json is sparsify's `SparseCoderConfig` (which no SAELens version writes):
    read as SAELens', it would give a plain ReLU SAE of the wrong width."""
    return "d_sae" not in raw and "architecture" not in raw and any(k in raw for k in SPARSIFY_CONFIG_KEYS)


def fold_topk_decoder_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens' `rescale_acts_by_decoder_norm` TopK weights -> the same SAE with unit decoder rows.

    SAELens 6.x trains TopK SAEs with that flag by default and writes it into every such
    cfg.json: its inference runs topk(pre * ‖W_dec_i‖) and decodes (acts / ‖W_dec_i‖) @ W_dec,
    which is exactly a plain TopK SAE whose W_enc columns and b_enc are scaled by the norms and
    whose decoder rows are unit. Done in float64 and cast back, so the fold adds no rounding beyond
    the file's own dtype.
    """
    W_enc, b_enc, W_dec = (state[name].double() for name in ("W_enc", "b_enc", "W_dec"))
    # The same clamp SAELens applies when it folds these norms itself.
    norms = W_dec.norm(dim=-1).clamp_min(1e-8)
    folded = {"W_enc": W_enc * norms, "b_enc": b_enc * norms, "W_dec": W_dec / norms[:, None]}
    return state | {name: tensor.to(state[name].dtype) for name, tensor in folded.items()}


def _is_saelens_folder(folder: Path) -> bool:
    # Tried last: other formats with a cfg.json (sparsify) are recognised by their weight files first.
    return (folder / SAE_CFG_FILENAME).is_file()


def _saelens_hub_layout(path: str) -> HubLayout:
    return HubLayout(
        folder=path,
        required=(repo_path(path, SAE_CFG_FILENAME), repo_path(path, SAE_WEIGHTS_FILENAME)),
        optional=(repo_path(path, SPARSITY_FILENAME),),
    )


def read_saelens_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read a folder written by us, by SAELens 6.x or by SAELens before 6.0."""
    if not (folder / SAE_CFG_FILENAME).is_file():
        raise SAELensError(f"{str(folder)!r} is not an SAE folder: {SAE_CFG_FILENAME} is missing")
    config = saelens_config(read_json(folder / SAE_CFG_FILENAME))
    state = read_safetensors(folder / SAE_WEIGHTS_FILENAME, device)
    if "scaling_factor" in state:
        # Pre-6.0 fine-tuning scale: fold a non-trivial one into the decoder rows' output.
        scale = state.pop("scaling_factor")
        if not torch.allclose(scale, torch.ones_like(scale)):
            state["W_dec"] = state["W_dec"] * scale[:, None]
    if config.pop("rescale_acts_by_decoder_norm", False):
        missing = {"W_enc", "b_enc", "W_dec"} - set(state)
        if not missing:
            state = fold_topk_decoder_norms(state)
    return SAEFiles(config, state, load_sparsity(folder))


register_format(
    "saelens", _is_saelens_folder, read_saelens_folder, priority=100, hub_layout=_saelens_hub_layout
)


__all__ = [
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SOURCE_METADATA_KEYS",
    "SPARSITY_FILENAME",
    "HubLayout",
    "SAEFiles",
    "SAEFormat",
    "detect_format",
    "get_format",
    "load_sparsity",
    "looks_like_sparsify_config",
    "read_json",
    "read_npz",
    "read_sae_folder",
    "read_safetensors",
    "read_torch_file",
    "register_format",
    "registered_formats",
    "repo_path",
    "sae_folder_contents",
    "saelens_config",
    "safe_relative_path",
    "scale_rows_and_columns",
    "write_sae_folder",
]


def load_sparsity(folder: str | Path) -> torch.Tensor | None:
    """The log10 feature densities saved beside an SAE (`sparsity.safetensors`), or None."""
    file = Path(folder) / SPARSITY_FILENAME
    return read_safetensors(file)["sparsity"] if file.is_file() else None
