"""circuit-tracer per-layer transcoder sets (`SingleLayerTranscoder`; e.g. the Llama-3.2-1B and
Qwen3 transcoders circuit-tracer loads): one `layer_<L>.safetensors` per layer, and a `config.yaml`
(`model_name`, `feature_input_hook`, `feature_output_hook`, `transcoders: [paths]`).

Each file holds `W_enc [d_sae, d_in]` (applied as `x @ W_enc.T`: our `W_enc` transposed),
`b_enc`, `W_dec [d_sae, d_out]`, `b_dec`, optionally `W_skip [d_out, d_in]` (applied as
`x @ W_skip.T`) and `activation_function.threshold` (JumpReLU). Inference:
`f = act(x @ W_enc.T + b_enc)`, `out = f @ W_dec + b_dec (+ x @ W_skip.T)`, no b_dec at the input,
with `act` ReLU, or JumpReLU `pre * (pre > t)`: the latter has no ReLU, so a negative threshold
lets negative pre-activations through, which our JumpReLU cannot do (refused). TopK files (a `k`
tensor; circuit-tracer keeps negative top-k values) are refused too.

Hooks come from `config.yaml` as `blocks.<L>.<hook>`, with TransformerLens-4 bridge names
(`mlp.hook_in`, `mlp.hook_out`) written as the TransformerLens ones the registry uses. Transcoder
paths in `config.yaml` that leave the folder (`..`, absolute) are refused; `hf://` ones are not
followed (the files must be in the folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sae_lens.converters._common import hook_metadata, read_only_member, require_tensors, weights_dtype
from sae_lens.errors import SAELensError
from sae_lens.sae_files import (
    HubLayout,
    SAEFiles,
    read_safetensors,
    register_format,
    repo_path,
    safe_relative_path,
)

CONFIG_FILENAME = "config.yaml"
_LAYER_FILE_RE = re.compile(r"layer_(\d+)\.safetensors")
_BRIDGE_HOOKS = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}


def read_set_config(folder: Path) -> dict[str, Any]:
    """`config.yaml` of a transcoder set ({} without one), its local transcoder paths checked."""
    path = folder / CONFIG_FILENAME
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SAELensError(f"{str(path)!r} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise SAELensError(f"{str(path)!r} must hold a mapping")
    for entry in value.get("transcoders") or []:
        if isinstance(entry, str) and "://" not in entry:
            safe_relative_path(entry, f"transcoder path in {path}")
    return value


def members(folder: Path) -> list[str]:
    """`layer_<L>` for each `layer_<L>.safetensors` in the folder, by layer."""
    found = [
        (int(m.group(1)), p.stem)
        for p in folder.glob("layer_*.safetensors")
        if (m := _LAYER_FILE_RE.fullmatch(p.name))
    ]
    return [stem for _, stem in sorted(found)]


def _is_transcoder_set(folder: Path) -> bool:
    return bool(members(folder))


def _hook(config: dict[str, Any], key: str, layer: int) -> str | None:
    hook = config.get(key)
    if not isinstance(hook, str) or not hook:
        return None
    hook = hook.removeprefix(f"blocks.{layer}.")
    return f"blocks.{layer}.{_BRIDGE_HOOKS.get(hook, hook)}"


def read_layer(folder: Path, member: str, device: str | None = None) -> SAEFiles:
    """Read the transcoder `member` (`layer_<L>`) of a circuit-tracer set into our layout."""
    set_config = read_set_config(folder)
    source = folder / f"{member.removesuffix('.safetensors')}.safetensors"
    state = read_safetensors(source, device)
    require_tensors(state, ("W_enc", "b_enc", "W_dec", "b_dec"), source, "circuit-tracer transcoder")
    if "k" in state:
        raise SAELensError(
            f"{str(source)!r} is a TopK transcoder; circuit-tracer keeps negative top-k values, which "
            "no architecture here computes"
        )
    ours = {
        "W_enc": state.pop("W_enc").T.contiguous(),
        "b_enc": state.pop("b_enc"),
        "W_dec": state.pop("W_dec"),
        "b_dec": state.pop("b_dec"),
    }
    skip = "W_skip" in state
    if skip:
        ours["W_skip"] = state.pop("W_skip").T.contiguous()
    d_in, d_sae = ours["W_enc"].shape
    architecture = "standard"
    threshold = state.pop("activation_function.threshold", None)
    if threshold is not None:
        if (threshold < 0).any() or threshold.isnan().any():
            raise SAELensError(
                f"{str(source)!r} has negative (or NaN) JumpReLU thresholds; its activation pre * (pre > t) "
                "has no ReLU and passes negative values, which no architecture here computes"
            )
        ours["threshold"] = threshold.to(ours["W_enc"].dtype).reshape(-1).expand(d_sae).contiguous()
        architecture = "jumprelu"
    match = _LAYER_FILE_RE.fullmatch(source.name)
    if match is None:
        raise SAELensError(f"{str(source)!r} is not named layer_<N>.safetensors")
    layer = int(match.group(1))
    metadata = hook_metadata(
        _hook(set_config, "feature_input_hook", layer),
        _hook(set_config, "feature_output_hook", layer),
        model_name=set_config.get("model_name"),
    )
    metadata.setdefault("hook_layer", layer)
    config = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": ours["W_dec"].shape[1],
        "dtype": weights_dtype(ours["W_enc"]),
        "apply_b_dec_to_input": False,
        "skip_connection": skip,
        "metadata": metadata,
    }
    return SAEFiles(config, ours)


def read_transcoder_set(folder: Path, device: str | None = None) -> SAEFiles:
    """Read the only transcoder of a set (`read_sae_folder` asks for an id when there are several)."""
    return read_only_member(folder, device, members, read_layer, "transcoders")


def _hub_layout(path: str) -> HubLayout | None:
    folder, _, name = path.rpartition("/")
    stem = name.removesuffix(".safetensors")
    if not re.fullmatch(r"layer_\d+", stem):
        return None
    return HubLayout(
        folder=folder,
        required=(repo_path(folder, f"{stem}.safetensors"),),
        optional=(repo_path(folder, CONFIG_FILENAME),),
        member=stem,
    )


register_format(
    "circuit_tracer",
    _is_transcoder_set,
    read_transcoder_set,
    priority=60,
    members=members,
    read_member=read_layer,
    hub_layout=_hub_layout,
)
