"""EleutherAI sparsify sparse coders (eai-sparsify 1.x; facts in tests/data/FORMATS.md sections 1-4).

A coder is a folder named after its hookpoint (`layers.3`, `h.1.mlp`, or `<hookpoint>/seed<N>/`)
holding `cfg.json` (`SparseCoderConfig` fields plus `d_in`) and `sae.safetensors`:
`encoder.weight [d_sae, d_in]` (our `W_enc` transposed), `encoder.bias`, `W_dec [d_sae, d_in]`,
`b_dec [d_in]` and, with `skip_connection`, `W_skip [d_out, d_in]` (applied as `x @ W_skip.T`).
A trainer run folder adds `config.json` (the run: `model`, `ctx_len`, `dataset`) beside one such
folder per hookpoint; `read_sae_folder(run, sae_id="layers.3")` picks one.

Inference: `topk(relu((x - b_dec) @ W_enc + b_enc), k)` (transcoders: no `- b_dec`), decoded as
`f @ W_dec + b_dec` (+ `x @ W_skip.T`). As a dense code that is exactly our TopK SAE (top k, then
ReLU). `multi_topk` only changes sparsify's training-time `forward` output and is ignored;
`groupmax` (one maximum per group of latents) is not a TopK and is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sae_lens.converters._common import hook_metadata, require_tensors, weights_dtype
from sae_lens.errors import SAELensError
from sae_lens.sae_files import HubLayout, SAEFiles, read_json, read_safetensors, register_format, repo_path

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
RUN_CONFIG_FILENAME = "config.json"
DEFAULT_K = 32
DEFAULT_EXPANSION_FACTOR = 32

_LAYER_RE = re.compile(
    r"(?:model\.|gpt_neox\.|transformer\.|base_model\.)?(?:layers|h)\.(\d+)"
    r"(?:\.(mlp|self_attn|attn|attention))?"
)
_EMBEDDING_HOOKPOINTS = {"embed_tokens", "wte", "embed_in", "embeddings"}


def hookpoint_hooks(hookpoint: str, transcoder: bool) -> tuple[str | None, str | None]:
    """TransformerLens `(hook_name, hook_name_out)` for a sparsify hookpoint (FORMATS.md section 4).

    An SAE reads the module's output; a transcoder reads the module's input and writes its output.
    `(None, None)` for hookpoints with no TransformerLens equivalent here.
    """
    if hookpoint.rsplit(".", 1)[-1] in _EMBEDDING_HOOKPOINTS and not transcoder:
        return "hook_embed", None
    match = _LAYER_RE.fullmatch(hookpoint)
    if match is None:
        return None, None
    layer, module = match.group(1), match.group(2)
    block = f"blocks.{layer}"
    if module is None:
        return (
            (f"{block}.hook_resid_pre", f"{block}.hook_resid_post")
            if transcoder
            else (
                f"{block}.hook_resid_post",
                None,
            )
        )
    if module == "mlp":
        # The MLP module's input is the residual stream after ln2 (not TL's pre-norm hook_mlp_in).
        return (
            (f"{block}.ln2.hook_normalized", f"{block}.hook_mlp_out")
            if transcoder
            else (
                f"{block}.hook_mlp_out",
                None,
            )
        )
    return (
        (f"{block}.ln1.hook_normalized", f"{block}.hook_attn_out")
        if transcoder
        else (
            f"{block}.hook_attn_out",
            None,
        )
    )


def _is_sparsify_folder(folder: Path) -> bool:
    return (folder / CFG_FILENAME).is_file() and (folder / WEIGHTS_FILENAME).is_file()


def _hookpoint_and_run_folder(folder: Path) -> tuple[str, Path]:
    # Several init seeds put each coder in <hookpoint>/seed<N>/.
    if re.fullmatch(r"seed\d+", folder.name):
        return folder.parent.name, folder.parent.parent
    return folder.name, folder.parent


def _run_metadata(run_folder: Path) -> dict[str, Any]:
    """model / context / dataset from a trainer run's config.json, when the folder is in a run."""
    path = run_folder / RUN_CONFIG_FILENAME
    if not path.is_file():
        return {}
    run = read_json(path)
    if not isinstance(run.get("sae"), dict):
        return {}  # some other config.json
    values = {
        "model_name": run.get("model"),
        "context_size": run.get("ctx_len"),
        "dataset_path": run.get("dataset"),
    }
    return {key: value for key, value in values.items() if value}


def read_sparsify_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read one sparsify coder folder into our layout (a TopK SAE, transcoder or skip transcoder)."""
    raw = read_json(folder / CFG_FILENAME)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SAELensError(
            f"{str(folder)!r} is a sparsify coder with activation {activation!r} (one maximum per group "
            "of latents), which no architecture here computes; only TopK coders load"
        )
    source = folder / WEIGHTS_FILENAME
    state = read_safetensors(source, device)
    require_tensors(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), source, "sparsify coder")
    encoder = state.pop("encoder.weight")
    d_sae, d_in = encoder.shape
    declared_in = raw.get("d_in", d_in)
    # num_latents 0 means "d_in * expansion_factor" (sparsify's own rule).
    declared_width = raw.get("num_latents") or declared_in * raw.get(
        "expansion_factor", DEFAULT_EXPANSION_FACTOR
    )
    if (declared_in, declared_width) != (d_in, d_sae):
        raise SAELensError(
            f"{str(source)!r} holds an encoder of shape {tuple(encoder.shape)}, but cfg.json describes "
            f"{declared_width} latents on d_in {declared_in}"
        )
    transcoder = bool(raw.get("transcode", False))
    skip = bool(raw.get("skip_connection", False)) or "W_skip" in state
    ours = {
        "W_enc": encoder.T.contiguous(),
        "b_enc": state.pop("encoder.bias"),
        "W_dec": state.pop("W_dec"),
        "b_dec": state.pop("b_dec"),
    }
    del encoder
    if skip:
        require_tensors(state, ("W_skip",), source, "sparsify skip transcoder")
        ours["W_skip"] = state.pop("W_skip").T.contiguous()
    hookpoint, run_folder = _hookpoint_and_run_folder(folder)
    hook_in, hook_out = hookpoint_hooks(hookpoint, transcoder)
    d_out = ours["W_dec"].shape[1]
    config: dict[str, Any] = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": int(raw.get("k", DEFAULT_K)),
        "dtype": weights_dtype(ours["W_enc"]),
        # Transcoders encode the raw input: b_dec is an output-space bias there.
        "apply_b_dec_to_input": not transcoder,
        "skip_connection": skip,
        "metadata": hook_metadata(hook_in, hook_out, hf_hook_name=hookpoint, **_run_metadata(run_folder)),
    }
    if transcoder or d_out != d_in:
        config["d_out"] = d_out
    return SAEFiles(config, ours)


def _hub_layout(path: str) -> HubLayout:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    # A run's config.json (model, context) sits beside the hookpoint folders.
    run_config = repo_path(parent, RUN_CONFIG_FILENAME)
    return HubLayout(
        folder=path,
        required=(repo_path(path, CFG_FILENAME), repo_path(path, WEIGHTS_FILENAME)),
        optional=(run_config,),
    )


# Before the SAELens format (priority 100): both folders hold a cfg.json.
register_format("sparsify", _is_sparsify_folder, read_sparsify_folder, priority=40, hub_layout=_hub_layout)
