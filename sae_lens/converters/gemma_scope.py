"""Gemma Scope (Gemma 2) JumpReLU SAEs and transcoders: one `params.npz` per SAE.

Repos `google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}` and `...-transcoders` hold
`layer_<L>/width_<W>/average_l0_<N>/params.npz` (and `embedding/...` for the embeddings) with
`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_out]`, `b_dec [d_out]` and
`threshold [d_sae]`, already in our orientation. Inference (the Gemma Scope tutorial):
`pre = x @ W_enc + b_enc`, `f = (pre > threshold) * relu(pre)`, `x_hat = f @ W_dec + b_dec`: our
JumpReLU with `apply_b_dec_to_input=False`. Attention SAEs read `attn.hook_z` with the heads
concatenated (`d_in = n_heads * d_head`); transcoders read the normalised MLP input
(`ln2.hook_normalized`) and write `hook_mlp_out`.

The files say nothing of the model or hook; those come from the registry, or are read off the
path: `layer_<L>` and a repo-named ancestor folder (`gemma-scope-2b-pt-res`, also inside the
Hugging Face cache's `models--google--gemma-scope-2b-pt-res`).
"""

from __future__ import annotations

import re
from pathlib import Path

from sae_lens.converters._common import hook_metadata, non_negative_threshold, require_tensors, weights_dtype
from sae_lens.sae_files import HubLayout, SAEFiles, read_npz, register_format, repo_path

PARAMS_FILENAME = "params.npz"

_REPO_RE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)")
_SITE_HOOKS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


def _is_gemma_scope_folder(folder: Path) -> bool:
    return (folder / PARAMS_FILENAME).is_file()


def path_hints(folder: Path) -> dict[str, str]:
    """model_name, hook_name (and hook_name_out) read off a Gemma Scope folder's path, when there."""
    parts = folder.absolute().parts
    layer = next((int(m.group(1)) for part in parts if (m := re.fullmatch(r"layer_(\d+)", part))), None)
    repo = next((m for part in reversed(parts) if (m := _REPO_RE.search(part))), None)
    hints: dict[str, str] = {}
    if repo is None:
        return hints
    size, variant, site = repo.groups()
    hints["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    if "embedding" in parts and site == "res":
        hints["hook_name"] = "hook_embed"
    elif layer is not None and site == "transcoders":
        hints["hook_name"] = f"blocks.{layer}.ln2.hook_normalized"
        hints["hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
    elif layer is not None:
        hints["hook_name"] = f"blocks.{layer}.{_SITE_HOOKS[site]}"
    return hints


def read_gemma_scope_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read a Gemma Scope `params.npz` folder into our layout (JumpReLU, no b_dec at the input)."""
    source = folder / PARAMS_FILENAME
    state = read_npz(source, device)
    require_tensors(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), source, "Gemma Scope params")
    ours = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    ours["threshold"] = non_negative_threshold(state["threshold"], source)
    d_in, d_sae = ours["W_enc"].shape
    d_out = ours["W_dec"].shape[1]
    hints = path_hints(folder)
    config = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": weights_dtype(ours["W_enc"]),
        "apply_b_dec_to_input": False,
        "metadata": hook_metadata(
            hints.get("hook_name"), hints.get("hook_name_out"), model_name=hints.get("model_name")
        ),
    }
    if d_out != d_in or "hook_name_out" in hints:
        config["d_out"] = d_out
    return SAEFiles(config, ours)


def _hub_layout(path: str) -> HubLayout:
    return HubLayout(folder=path, required=(repo_path(path, PARAMS_FILENAME),))


register_format(
    "gemma_scope", _is_gemma_scope_folder, read_gemma_scope_folder, priority=30, hub_layout=_hub_layout
)
