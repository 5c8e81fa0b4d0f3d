"""Attention-output SAEs on `hook_z` (Kissane, Krzyzanowski et al. 2024; release
`ckkissane/attn-saes-gpt2-small-all-layers`): one `<name>.pt` per layer beside `<name>_cfg.json`.

The `.pt` is a state dict already in our names and orientation: `W_enc [d_in, d_sae]`, `b_enc`,
`W_dec [d_sae, d_in]`, `b_dec`, with `d_in = n_heads * d_head` (the heads' `z` concatenated).
Inference is a standard ReLU SAE: `relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec`. The config
names the width (`dict_size`), input width (`act_size`), hook (`act_name`, e.g.
`blocks.0.attn.hook_z`), `layer`, `seq_len` and `model_name` (`gpt2-small`).

A folder holds many such pairs, so each is a member: `sae_id` is the `.pt` file's name (with or
without `.pt`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lens.converters._common import (
    check_widths,
    hook_metadata,
    read_only_member,
    require_tensors,
    weights_dtype,
)
from sae_lens.sae_files import HubLayout, SAEFiles, read_json, read_torch_file, register_format

CFG_SUFFIX = "_cfg.json"
# TransformerLens model names in these configs -> the Hugging Face names our models load.
_MODEL_NAMES = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium"}


def members(folder: Path) -> list[str]:
    """The `.pt` files of `folder` that have a `<stem>_cfg.json` beside them."""
    return sorted(p.name for p in folder.glob("*.pt") if (folder / f"{p.stem}{CFG_SUFFIX}").is_file())


def _is_hook_z_folder(folder: Path) -> bool:
    return bool(members(folder))


def read_hook_z_member(folder: Path, member: str, device: str | None = None) -> SAEFiles:
    """Read the hook-z SAE `member` (`<name>.pt`) of `folder` into our layout."""
    name = member.removesuffix(".pt")
    raw = read_json(folder / f"{name}{CFG_SUFFIX}")
    source = folder / f"{name}.pt"
    state = read_torch_file(source, device)
    require_tensors(state, ("W_enc", "b_enc", "W_dec", "b_dec"), source, "hook-z SAE")
    ours = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    d_in, d_sae = ours["W_enc"].shape
    declared = {"act_size": raw.get("act_size", d_in), "dict_size": raw.get("dict_size", d_sae)}
    check_widths(source, d_in, d_sae, "encoder", "its config", declared)
    layer = raw.get("layer")
    hook = raw.get("act_name") or (f"blocks.{layer}.attn.hook_z" if isinstance(layer, int) else None)
    model = raw.get("model_name")
    extra: dict[str, Any] = {
        "model_name": _MODEL_NAMES.get(model, model) if isinstance(model, str) else None,
        "context_size": raw.get("seq_len"),
    }
    # One head's z when the heads were not concatenated.
    if raw.get("concat_heads") is False and isinstance(raw.get("head"), int):
        extra["hook_head_index"] = raw["head"]
    config = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": weights_dtype(ours["W_enc"]),
        "metadata": hook_metadata(hook, **extra),
    }
    return SAEFiles(config, ours)


def read_hook_z_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read the only hook-z SAE of `folder` (`read_sae_folder` asks for an id when there are several)."""
    return read_only_member(folder, device, members, read_hook_z_member, "hook-z SAEs")


def _hub_layout(path: str) -> HubLayout | None:
    if not path.endswith(".pt"):
        return None
    folder, _, name = path.rpartition("/")
    return HubLayout(folder=folder, required=(path, f"{path.removesuffix('.pt')}{CFG_SUFFIX}"), member=name)


register_format(
    "connor_rob_hook_z",
    _is_hook_z_folder,
    read_hook_z_folder,
    priority=60,
    members=members,
    read_member=read_hook_z_member,
    hub_layout=_hub_layout,
)
