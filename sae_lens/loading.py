"""Reading SAE folders: ours, SAELens 6.x, and SAELens before 6.0.

All three share `cfg.json` + `sae_weights.safetensors`; they differ in the config's key names:

- 6.x: `architecture`, `d_in`, `d_sae`, architecture fields (`k`, ...) and `metadata` (or `meta`)
  holding `hook_name`, `model_name`, `context_size`, ...
- before 6.0: a flat dict with `hook_point`/`hook_name`, `activation_fn_str` (`relu`/`topk`) and
  `activation_fn_kwargs` (`{"k": K}`), sometimes `expansion_factor` instead of `d_sae`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_lens.errors import SAELensError
from sae_lens.saes.sae import (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    SAEConfig,
    SparseAutoencoder,
    get_architecture_class,
)

_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "exclude_special_tokens",
    "model_class_name",
    "neuronpedia_id",
)
_LEGACY_METADATA_KEYS = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
}


def sae_config_from_dict(raw: dict[str, Any]) -> SAEConfig:
    """Normalise a `cfg.json` from any supported SAELens version into an `SAEConfig`."""
    raw = dict(raw)
    metadata: dict[str, Any] = dict(raw.pop("metadata", None) or raw.pop("meta", None) or {})
    for key in _METADATA_KEYS:
        if key in raw and key not in metadata:
            metadata[key] = raw[key]
    for old, new in _LEGACY_METADATA_KEYS.items():
        if old in raw and new not in metadata:
            metadata[new] = raw[old]

    architecture = raw.get("architecture")
    kwargs = raw.get("activation_fn_kwargs") or {}
    if architecture is None or architecture == "standard":
        # Before 6.0 a TopK SAE was a "standard" one whose activation function was topk.
        activation = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
        architecture = "topk" if activation == "topk" else "standard"
    get_architecture_class(architecture)  # unknown names fail here, with the known ones listed

    if "d_in" not in raw:
        raise SAELensError("cfg.json has no d_in; it is not an SAE config")
    d_sae = raw.get("d_sae")
    if d_sae is None and raw.get("expansion_factor") is not None:
        d_sae = int(raw["d_in"] * raw["expansion_factor"])
    if d_sae is None:
        raise SAELensError("cfg.json has neither d_sae nor expansion_factor")
    dtype = str(raw.get("dtype", "float32")).removeprefix("torch.")
    normalize = raw.get("normalize_activations") or "none"
    if normalize not in ("none", "expected_average_only_in"):
        raise SAELensError(
            f"cfg.json uses normalize_activations={normalize!r}, which this library cannot run yet"
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise SAELensError(
            "cfg.json sets rescale_acts_by_decoder_norm, which this library cannot run yet; "
            "fold the decoder norms into the encoder before saving"
        )
    handled = {"d_in", "d_sae", "architecture", "dtype", "device", "apply_b_dec_to_input"}
    handled |= {"normalize_activations", "k", "metadata"}
    optional = {
        f.name: raw[f.name]
        for f in dataclasses.fields(SAEConfig)
        if f.name not in handled and raw.get(f.name) is not None
    }
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(d_sae),
        architecture=architecture,
        dtype=dtype,
        device=str(raw.get("device", "cpu")),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        k=raw.get("k", kwargs.get("k")),
        metadata=metadata,
        **optional,
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a corrupt or truncated file into a one-line error."""
    if not path.is_file():
        raise SAELensError(f"{str(path)!r} does not exist; an SAE folder needs {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SAELensError(
            f"{str(path)!r} is corrupt or truncated ({reason}); re-save or re-download it"
        ) from None


def load_sae_folder(path: str | Path, device: str | None = None) -> SparseAutoencoder:
    """Build the SAE described by `path/cfg.json` and load `path/sae_weights.safetensors`."""
    folder = Path(path)
    cfg_path = folder / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise SAELensError(f"{str(folder)!r} is not an SAE folder: {SAE_CFG_FILENAME} is missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as error:
        raise SAELensError(f"{str(cfg_path)!r} is not valid JSON ({error.msg})") from None
    # SAELens 6.x trains TopK SAEs with rescale_acts_by_decoder_norm=True by default and writes the
    # flag into every such inference cfg.json. Its TopK inference then runs topk(pre * ‖W_dec_i‖)
    # and decodes (acts / ‖W_dec_i‖) @ W_dec, which is exactly a plain TopK SAE whose W_enc columns
    # and b_enc are scaled by the norms and whose decoder rows are made unit: so fold it here rather
    # than refuse the folder. (Only its `topk` inference config has the flag; elsewhere it still fails.)
    fold_decoder_norms = raw.get("architecture") == "topk" and bool(raw.get("rescale_acts_by_decoder_norm"))
    if fold_decoder_norms:
        raw = {key: value for key, value in raw.items() if key != "rescale_acts_by_decoder_norm"}
    cfg = sae_config_from_dict(raw)
    if device is not None:
        cfg.device = device
    state = read_weights(folder / SAE_WEIGHTS_FILENAME)
    sae = SparseAutoencoder.from_config(cfg)
    expected = sae.state_dict()
    if "scaling_factor" in state:
        # Pre-6.0 fine-tuning scale: fold a non-trivial one into the decoder rows' output.
        scale = state.pop("scaling_factor")
        if not torch.allclose(scale, torch.ones_like(scale)):
            state["W_dec"] = state["W_dec"] * scale[:, None]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SAELensError(
            f"{SAE_WEIGHTS_FILENAME} in {str(folder)!r} does not match a {cfg.architecture} SAE "
            f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise SAELensError(
                f"{name} in {str(folder)!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)} from cfg.json"
            )
    if fold_decoder_norms:
        state = fold_topk_decoder_norms(state)
    sae.load_state_dict({name: t.to(sae.dtype) for name, t in state.items()})
    return sae


def fold_topk_decoder_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens' `rescale_acts_by_decoder_norm` TopK weights -> the same SAE with unit decoder rows.

    Done in float64 and cast back, so the fold adds no rounding beyond the file's own dtype.
    """
    W_enc, b_enc, W_dec = (state[name].double() for name in ("W_enc", "b_enc", "W_dec"))
    # The same clamp SAELens applies when it folds these norms itself.
    norms = W_dec.norm(dim=-1).clamp_min(1e-8)
    folded = {"W_enc": W_enc * norms, "b_enc": b_enc * norms, "W_dec": W_dec / norms[:, None]}
    return state | {name: tensor.to(state[name].dtype) for name, tensor in folded.items()}


def load_sparsity(path: str | Path) -> torch.Tensor | None:
    """The log10 feature densities saved beside an SAE, or None when the folder has none."""
    file = Path(path) / SPARSITY_FILENAME
    if not file.is_file():
        return None
    return read_weights(file)["sparsity"]
