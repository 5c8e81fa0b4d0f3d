"""Llama Scope SAEs and transcoders (OpenMOSS Language-Model-SAEs): `hyperparams.json` +
`checkpoints/final.safetensors`.

Repos `fnlp/Llama3_1-8B-Base-LX{R,A,M,TC}-{8x,32x}` hold one folder per layer,
`Llama3_1-8B-Base-L<L><site>-<n>x/`. The weights are `nn.Linear` ones: `encoder.weight
[d_sae, d_in]`, `encoder.bias`, `decoder.weight [d_out, d_sae]`, `decoder.bias` (newer
Language-Model-SAEs files: `W_E [d_in, d_sae]`, `b_E`, `W_D [d_sae, d_out]`, `b_D`).
`hyperparams.json` gives `d_model`, `d_sae`, `hook_point_in`/`hook_point_out` (TransformerLens
names), `act_fn` (`jumprelu`, or `topk` with `top_k`), `jump_relu_threshold`,
`norm_activation` (`dataset-wise`) with `dataset_average_activation_norm {"in", "out"}`, and
`sparsity_include_decoder_norm`.

What the library computes at inference, and what we reproduce exactly:

- training saw `x * s_in` and predicted `y * s_out`, with `s = sqrt(d_model) / average norm`
  (`dataset-wise` normalisation); for inference the library folds these into the parameters
  (`b_E / s_in`, `W_D * s_in / s_out`, `b_D / s_out`), so the SAE takes raw activations;
- with `sparsity_include_decoder_norm` it then makes the decoder unit-norm, moving each latent's
  decoder norm `n_i` into its encoder row and bias (outputs unchanged);
- the activation is `z * (z > jump_relu_threshold)` on those pre-activations `z` (TopK: the top k).

Composed: `W_enc = E^T * n'`, `b_enc = b_E * n' / s_in`, `W_dec = D^T / ||D_i||` (unit rows),
`b_dec = b_D / s_out`, `threshold = jump_relu_threshold` for every latent, no b_dec at the input,
where `n' = ||D_i|| * s_in / s_out` (1 without `sparsity_include_decoder_norm`). Features are the
library's inference-mode `encode`; SAELens reports them multiplied by `s_in` (it keeps the
training scale and multiplies the threshold by `s_in` instead); reconstructions agree.
Every fold is done in float64 and rounded once.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from sae_lens.converters._common import check_widths, hook_metadata, require_tensors, weights_dtype
from sae_lens.errors import SAELensError
from sae_lens.sae_files import (
    HubLayout,
    SAEFiles,
    read_json,
    read_safetensors,
    register_format,
    repo_path,
    scale_rows_and_columns,
)

HYPERPARAMS_FILENAME = "hyperparams.json"
WEIGHTS_PATH = "checkpoints/final.safetensors"
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"


def _is_llama_scope_folder(folder: Path) -> bool:
    return (folder / HYPERPARAMS_FILENAME).is_file() and (folder / WEIGHTS_PATH).is_file()


def norm_factors(hyperparams: dict[str, Any], source: Path) -> tuple[float, float]:
    """`(s_in, s_out)`: the scales training applied to the input and the target."""
    mode = hyperparams.get("norm_activation", "dataset-wise")
    if mode in ("inference", "none", None):
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise SAELensError(
            f"{str(source)!r} uses norm_activation {mode!r} (a per-token rescaling), which cannot be folded "
            "into the weights; only dataset-wise normalised Llama Scope SAEs load"
        )
    norms = hyperparams.get("dataset_average_activation_norm")
    if not isinstance(norms, dict) or not {"in", "out"} <= set(norms):
        raise SAELensError(
            f"{str(source)!r} is dataset-wise normalised but has no dataset_average_activation_norm"
        )
    root = math.sqrt(hyperparams["d_model"])
    return root / float(norms["in"]), root / float(norms["out"])


def _tensors(
    state: dict[str, torch.Tensor], source: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(E^T [d_in, d_sae], b_E, D^T [d_sae, d_out], b_D or None)` in our orientation."""
    if "encoder.weight" in state:
        require_tensors(state, ("encoder.weight", "encoder.bias", "decoder.weight"), source, "Llama Scope")
        W_enc = state.pop("encoder.weight").T.contiguous()
        W_dec = state.pop("decoder.weight").T.contiguous()
        return W_enc, state.pop("encoder.bias"), W_dec, state.get("decoder.bias")
    require_tensors(state, ("W_E", "b_E", "W_D"), source, "Llama Scope")
    return state.pop("W_E"), state.pop("b_E"), state.pop("W_D"), state.get("b_D")


def read_llama_scope_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read a Llama Scope folder into our layout, normalisation folded (see the module docstring)."""
    source = folder / HYPERPARAMS_FILENAME
    hyperparams = read_json(source)
    for key in ("d_model", "d_sae"):
        if key not in hyperparams:
            raise SAELensError(f"{str(source)!r} has no {key}; it is not a Llama Scope hyperparams.json")
    if hyperparams.get("use_glu_encoder"):
        raise SAELensError(f"{str(source)!r} uses a GLU encoder, which no architecture here computes")
    s_in, s_out = norm_factors(hyperparams, source)
    act_fn = str(hyperparams.get("act_fn", "relu")).lower()
    threshold = float(hyperparams.get("jump_relu_threshold", 0.0) or 0.0)
    # The library runs a TopK checkpoint with a positive jump_relu_threshold as JumpReLU at inference.
    if act_fn == "topk" and threshold > 0:
        act_fn = "jumprelu"
    if act_fn not in ("jumprelu", "topk", "relu"):
        raise SAELensError(f"{str(source)!r} has act_fn {act_fn!r}; only jumprelu, topk and relu load")
    if threshold < 0:
        # z * (z > t) with t < 0 lets negative pre-activations through: not our JumpReLU.
        raise SAELensError(
            f"{str(source)!r} has a negative jump_relu_threshold ({threshold}), which cannot be represented"
        )
    weights = folder / WEIGHTS_PATH
    W_enc, b_enc, W_dec, b_dec = _tensors(read_safetensors(weights, device), weights)
    d_in, d_sae = W_enc.shape
    d_out = W_dec.shape[1]
    declared = {"d_model": hyperparams["d_model"], "d_sae": hyperparams["d_sae"]}
    check_widths(weights, d_in, d_sae, "encoder", "hyperparams.json", declared)
    if b_dec is None or not hyperparams.get("use_decoder_bias", True):
        b_dec = torch.zeros(d_out, dtype=W_dec.dtype, device=W_dec.device)
    decoder_norms = W_dec.double().norm(dim=-1)
    if hyperparams.get("sparsity_include_decoder_norm", True):
        moved = decoder_norms * (s_in / s_out)  # the standardised decoder's norms, moved into the encoder
        scale_rows_and_columns(W_dec, rows=1 / decoder_norms)
    else:
        moved = torch.ones_like(decoder_norms)
        scale_rows_and_columns(W_dec, factor=s_in / s_out)
    scale_rows_and_columns(W_enc, columns=moved)
    scale_rows_and_columns(b_enc, columns=moved, factor=1 / s_in)
    scale_rows_and_columns(b_dec, factor=1 / s_out)
    ours = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    options: dict[str, Any] = {}
    apply_b_dec = bool(hyperparams.get("apply_decoder_bias_to_pre_encoder", False))
    if apply_b_dec and s_in != s_out:
        raise SAELensError(
            f"{str(source)!r} subtracts an output-space bias from a differently normalised input"
        )
    if act_fn == "jumprelu":
        ours["threshold"] = torch.full((d_sae,), threshold, dtype=W_enc.dtype, device=W_enc.device)
        architecture = "jumprelu"
    elif act_fn == "topk":
        if not hyperparams.get("top_k"):
            raise SAELensError(f"{str(source)!r} is a TopK SAE without top_k")
        architecture, options = "topk", {"k": int(hyperparams["top_k"])}
    else:
        architecture = "standard"
    hook_in, hook_out = hyperparams.get("hook_point_in"), hyperparams.get("hook_point_out")
    config: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": weights_dtype(W_enc),
        "apply_b_dec_to_input": apply_b_dec,
        **options,
        "metadata": hook_metadata(
            hook_in,
            hook_out,
            model_name=hyperparams.get("model_name") or _model_from_folder(folder),
            dataset_norm_scaling_factor_in=s_in,
        ),
    }
    if d_out != d_in or (hook_out is not None and hook_out != hook_in):
        config["d_out"] = d_out
    return SAEFiles(config, ours)


def _model_from_folder(folder: Path) -> str | None:
    return DEFAULT_MODEL if re.match(r"Llama3_1-8B-Base-", folder.name) else None


def _hub_layout(path: str) -> HubLayout:
    return HubLayout(
        folder=path, required=(repo_path(path, HYPERPARAMS_FILENAME), repo_path(path, WEIGHTS_PATH))
    )


register_format(
    "llama_scope", _is_llama_scope_folder, read_llama_scope_folder, priority=30, hub_layout=_hub_layout
)
