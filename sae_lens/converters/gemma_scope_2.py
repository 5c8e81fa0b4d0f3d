"""Gemma Scope 2 (Gemma 3) JumpReLU SAEs and transcoders: `config.json` + `params.safetensors`.

Repos `google/gemma-scope-2-<size>-{pt,it}` hold one folder per SAE, grouped by site
(`resid_post/`, `mlp_out/`, `attn_out/`, `transcoder/`, and `*_all/` variants), e.g.
`resid_post/layer_12_width_16k_l0_medium/`. `params.safetensors` holds `w_enc [d_in, d_sae]`,
`b_enc`, `w_dec [d_sae, d_out]`, `b_dec`, `threshold [d_sae]` and, for affine (skip) transcoders,
`affine_skip_connection [d_in, d_out]`; `config.json` names the Hugging Face module it reads
(`hf_hook_point_in`, e.g. `model.layers.12.output`), the one it writes (`hf_hook_point_out`),
`model_name`, `width`, `l0`, `architecture` (`jump_relu`) and `type`.

Inference (Gemma Scope 2's published reference): `pre = x @ w_enc + b_enc`,
`f = (pre > threshold) * relu(pre)`, `out = f @ w_dec + b_dec (+ x @ affine_skip_connection)`: our
JumpReLU with `apply_b_dec_to_input=False` and, for affine transcoders, `W_skip`. Multi-layer
dictionaries (crosscoders, CLTs: 3-D `w_dec`) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sae_lens.converters._common import hook_metadata, non_negative_threshold, require_tensors, weights_dtype
from sae_lens.errors import SAELensError
from sae_lens.sae_files import HubLayout, SAEFiles, read_json, read_safetensors, register_format, repo_path

CONFIG_FILENAME = "config.json"
PARAMS_FILENAME = "params.safetensors"

_HF_MODULE_HOOKS = {
    "output": "hook_resid_post",
    "pre_feedforward_layernorm.output": "ln2.hook_normalized",
    "post_feedforward_layernorm.output": "hook_mlp_out",
    "self_attn.o_proj.input": "attn.hook_z",
}
_FOLDER_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}


def hf_module_hook(hf_name: str | None) -> str | None:
    """`model.layers.12.output` -> `blocks.12.hook_resid_post`, and the other modules Gemma Scope 2
    reads (the normalised MLP input, the post-norm MLP output, the attention heads' concatenated
    output); None for anything else."""
    match = re.fullmatch(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(.+)", hf_name or "")
    if match is None or match.group(2) not in _HF_MODULE_HOOKS:
        return None
    return f"blocks.{match.group(1)}.{_HF_MODULE_HOOKS[match.group(2)]}"


def _folder_hooks(folder: Path) -> tuple[str | None, str | None]:
    # Fallback when config.json names no module we know: the site folder and layer_<L>_ name.
    layer = re.match(r"layer_(\d+)_", folder.name)
    site = folder.parent.name.removesuffix("_all")
    if layer is None:
        return None, None
    block = f"blocks.{layer.group(1)}"
    if site == "transcoder":
        return f"{block}.ln2.hook_normalized", f"{block}.hook_mlp_out"
    return (f"{block}.{_FOLDER_HOOKS[site]}", None) if site in _FOLDER_HOOKS else (None, None)


def _is_gemma_scope_2_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILENAME).is_file() and (folder / PARAMS_FILENAME).is_file()


def read_gemma_scope_2_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read a Gemma Scope 2 folder into our layout (JumpReLU, no b_dec at the input, skip path)."""
    raw = read_json(folder / CONFIG_FILENAME)
    architecture = str(raw.get("architecture", "jump_relu")).replace("_", "")
    if architecture != "jumprelu":
        raise SAELensError(
            f"{str(folder)!r} is a Gemma Scope 2 {raw.get('architecture')!r} dictionary; only JumpReLU ones load"
        )
    source = folder / PARAMS_FILENAME
    state = read_safetensors(source, device)
    require_tensors(state, ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"), source, "Gemma Scope 2 params")
    if state["w_dec"].ndim != 2 or state["w_enc"].ndim != 2:
        raise SAELensError(
            f"{str(source)!r} is a multi-layer dictionary (crosscoder or cross-layer transcoder, "
            f"w_dec of shape {tuple(state['w_dec'].shape)}); only single-layer SAEs and transcoders load"
        )
    ours = {
        "W_enc": state["w_enc"],
        "b_enc": state["b_enc"],
        "W_dec": state["w_dec"],
        "b_dec": state["b_dec"],
        "threshold": non_negative_threshold(state["threshold"], source),
    }
    skip = "affine_skip_connection" in state
    if skip:
        ours["W_skip"] = state["affine_skip_connection"]  # applied as x @ W, our orientation
    d_in, d_sae = ours["W_enc"].shape
    d_out = ours["W_dec"].shape[1]
    hook_in, hook_out = (
        hf_module_hook(raw.get("hf_hook_point_in")),
        hf_module_hook(raw.get("hf_hook_point_out")),
    )
    if hook_in is None:
        hook_in, hook_out = _folder_hooks(folder)
    model_name = raw.get("model_name")
    if isinstance(model_name, str) and "/" not in model_name:
        model_name = f"google/{model_name}"
    metadata: dict[str, Any] = hook_metadata(
        hook_in,
        hook_out,
        model_name=model_name,
        hf_hook_name=raw.get("hf_hook_point_in"),
        hf_hook_name_out=raw.get("hf_hook_point_out")
        if raw.get("hf_hook_point_out") != raw.get("hf_hook_point_in")
        else None,
    )
    config: dict[str, Any] = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": weights_dtype(ours["W_enc"]),
        "apply_b_dec_to_input": False,
        "skip_connection": skip,
        "metadata": metadata,
    }
    if d_out != d_in or "hook_name_out" in metadata:
        config["d_out"] = d_out
    return SAEFiles(config, ours)


def _hub_layout(path: str) -> HubLayout:
    return HubLayout(
        folder=path, required=(repo_path(path, CONFIG_FILENAME), repo_path(path, PARAMS_FILENAME))
    )


# Before dictionary_learning's config.json + ae.pt and the SAELens format; the weight file decides.
register_format(
    "gemma_scope_2", _is_gemma_scope_2_folder, read_gemma_scope_2_folder, priority=30, hub_layout=_hub_layout
)
