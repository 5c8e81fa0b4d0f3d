"""saprmarks/dictionary_learning dictionaries (0.1.x; facts in tests/data/FORMATS.md sections 5-7).

A folder (`trainer_<i>/`) holds `ae.pt` (the dictionary's `state_dict`, parameters and buffers) and
`config.json` with a `trainer` section (`dict_class`, `activation_dim`, `dict_size`, `k`, `layer`,
`lm_name`, `submodule_name`, ...). The class is told by the state dict's keys, not by `dict_class`
(trainers hard-code `"AutoEncoder"` whatever they trained); only AutoEncoderTopK and BatchTopKSAE,
whose keys are identical, need `dict_class`. Each class maps exactly onto one of our architectures:

| class | keys | ours |
|---|---|---|
| AutoEncoder (and the April update) | `bias`, `encoder.*`, `decoder.weight` | standard; decoder norms folded as the library's loader does |
| AutoEncoderNew | `encoder.*`, `decoder.*` | standard without `- b_dec` at the input |
| GatedAutoEncoder | `decoder_bias`, `r_mag`, `gate_bias`, `mag_bias`, ... | gated |
| AutoEncoderTopK | `b_dec`, `k`, `threshold` (unused), ... | topk |
| BatchTopKSAE | same keys | jumprelu: `relu(pre) * (relu(pre) > t)` with one scalar t |
| MatryoshkaBatchTopKSAE | `W_enc`, ..., `k`, `threshold`, `group_sizes` | jumprelu, as BatchTopK |
| JumpReluAutoEncoder | `W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold` | jumprelu without `- b_dec` |

The `nn.Linear` classes store `encoder.weight [d_sae, d_in]` and `decoder.weight [d_in, d_sae]`, the
transpose of ours. Thresholds: the library's activations apply a ReLU, so a negative threshold
(left by short BatchTopK runs, or learned by JumpReLU) acts as 0 and is stored as 0, which is exact
(see `_common.non_negative_threshold`). Trained with `normalize_activations`, the saved weights
already take raw activations (the library scales the biases back at save); nothing is rescaled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sae_lens.converters._common import (
    check_widths,
    hook_metadata,
    non_negative_threshold,
    require_tensors,
    weights_dtype,
)
from sae_lens.errors import SAELensError
from sae_lens.sae_files import (
    HubLayout,
    SAEFiles,
    read_json,
    read_torch_file,
    register_format,
    repo_path,
    scale_rows_and_columns,
)

WEIGHTS_FILENAME = "ae.pt"
CONFIG_FILENAME = "config.json"

# The state-dict keys that identify each class (FORMATS.md section 5).
_CLASS_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "GatedAutoEncoder": {
        "decoder_bias",
        "r_mag",
        "gate_bias",
        "mag_bias",
        "encoder.weight",
        "decoder.weight",
    },
    "TopK": {"b_dec", "k", "threshold", "decoder.weight", "encoder.weight", "encoder.bias"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}


def _is_dictionary_learning_folder(folder: Path) -> bool:
    return (folder / WEIGHTS_FILENAME).is_file() and (folder / CONFIG_FILENAME).is_file()


def dictionary_class(state: dict[str, torch.Tensor], trainer: dict[str, Any], source: Path) -> str:
    """The dictionary_learning class that wrote `state` (by its keys; `dict_class` only for TopK)."""
    keys = set(state)
    name = next((name for name, expected in _CLASS_KEYS.items() if keys == expected), None)
    if name is None:
        raise SAELensError(
            f"{str(source)!r} is not a dictionary_learning dictionary this library knows "
            f"(keys: {', '.join(sorted(keys))})"
        )
    if name != "TopK":
        return name
    # AutoEncoderTopK and BatchTopKSAE save the same tensors but infer differently.
    dict_class = str(trainer.get("dict_class", ""))
    trainer_class = str(trainer.get("trainer_class", ""))
    if dict_class == "BatchTopKSAE" or (not dict_class and "BatchTopK" in trainer_class):
        return "BatchTopKSAE"
    if dict_class == "AutoEncoderTopK" or (not dict_class and trainer_class == "TopKTrainer"):
        return "AutoEncoderTopK"
    raise SAELensError(
        f"{str(source)!r} has TopK-family tensors but config.json names dict_class {dict_class!r}; "
        "expected AutoEncoderTopK or BatchTopKSAE"
    )


def _fold_decoder_norms(ours: dict[str, torch.Tensor]) -> None:
    """What `AutoEncoder.from_pretrained` (the library's default load) does to a decoder whose
    columns are not unit norm: divide each by its norm and scale the encoder row and bias by it.
    Outputs are unchanged; features become the library's `encode`."""
    norms = ours["W_dec"].double().norm(dim=-1)
    if torch.allclose(norms, torch.ones_like(norms)):
        return
    scale_rows_and_columns(ours["W_dec"], rows=1 / norms)
    scale_rows_and_columns(ours["W_enc"], columns=norms)
    scale_rows_and_columns(ours["b_enc"], columns=norms)


def convert_state(
    name: str, state: dict[str, torch.Tensor], source: Path
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(our architecture, its config options, our state dict) for a dictionary of class `name`."""
    if name in ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        # nn.Linear layouts: both matrices are stored transposed.
        W_enc = state.pop("encoder.weight").T.contiguous()
        W_dec = state.pop("decoder.weight").T.contiguous()
    else:
        W_enc, W_dec = state.pop("W_enc"), state.pop("W_dec")
    d_sae = W_enc.shape[1]
    if name == "AutoEncoder":
        ours = {"W_enc": W_enc, "b_enc": state["encoder.bias"], "W_dec": W_dec, "b_dec": state["bias"]}
        _fold_decoder_norms(ours)
        return "standard", {}, ours
    if name == "AutoEncoderNew":
        ours = {
            "W_enc": W_enc,
            "b_enc": state["encoder.bias"],
            "W_dec": W_dec,
            "b_dec": state["decoder.bias"],
        }
        return "standard", {"apply_b_dec_to_input": False}, ours
    if name == "GatedAutoEncoder":
        ours = {
            "W_enc": W_enc,
            "b_gate": state["gate_bias"],
            "r_mag": state["r_mag"],
            "b_mag": state["mag_bias"],
            "W_dec": W_dec,
            "b_dec": state["decoder_bias"],
        }
        return "gated", {}, ours
    biases = {
        "b_enc": state["encoder.bias"] if "encoder.bias" in state else state["b_enc"],
        "b_dec": state["b_dec"],
    }
    ours = {"W_enc": W_enc, "W_dec": W_dec, **biases}
    if name == "AutoEncoderTopK":
        # Its default encode ignores `threshold`: a per-token top k of relu((x - b_dec) @ W_enc + b_enc).
        return "topk", {"k": int(state["k"])}, ours
    threshold = state["threshold"].to(W_enc.dtype)
    if name == "JumpReluAutoEncoder":
        # relu(pre * (pre > t)) with pre = x @ W_enc + b_enc: no b_dec at the input.
        ours["threshold"] = non_negative_threshold(threshold, source)
        return "jumprelu", {"apply_b_dec_to_input": False}, ours
    # BatchTopK / Matryoshka infer with one scalar threshold on relu((x - b_dec) @ W_enc + b_enc);
    # Matryoshka's inference zeroes no group (all groups are active once loaded).
    ours["threshold"] = non_negative_threshold(threshold.reshape(()).expand(d_sae).contiguous(), source)
    return "jumprelu", {}, ours


def hook_for_submodule(submodule_name: str | None, layer: int | None) -> str | None:
    """`resid_post_layer_N` (the library's training scripts' name for a block's output) ->
    `blocks.N.hook_resid_post`; None for other submodules, which the files do not pin down."""
    match = re.fullmatch(r"resid_post_layer_(\d+)", submodule_name or "")
    if match:
        return f"blocks.{match.group(1)}.hook_resid_post"
    return None


def read_dictionary_learning_folder(folder: Path, device: str | None = None) -> SAEFiles:
    """Read a dictionary_learning `trainer_<i>/` folder into our layout."""
    config = read_json(folder / CONFIG_FILENAME)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise SAELensError(
            f"{str(folder / CONFIG_FILENAME)!r} has no 'trainer' section; it is not a dictionary_learning config"
        )
    source = folder / WEIGHTS_FILENAME
    state = read_torch_file(source, device)
    name = dictionary_class(state, trainer, source)
    architecture, options, ours = convert_state(name, state, source)
    require_tensors(ours, ("W_enc", "W_dec", "b_dec"), source, "dictionary_learning")
    d_in, d_sae = ours["W_enc"].shape
    declared = {
        "activation_dim": trainer.get("activation_dim", d_in),
        "dict_size": trainer.get("dict_size", d_sae),
    }
    check_widths(source, d_in, d_sae, "dictionary", "config.json", declared)
    if architecture == "topk" and trainer.get("k") not in (None, options["k"]):
        raise SAELensError(f"{str(source)!r} has k = {options['k']} but config.json says k = {trainer['k']}")
    layer = trainer.get("layer")
    buffer = config.get("buffer")
    if not isinstance(buffer, dict):
        buffer = {}
    metadata = hook_metadata(
        hook_for_submodule(trainer.get("submodule_name"), layer),
        model_name=trainer.get("lm_name"),
        context_size=buffer.get("ctx_len"),
        dictionary_learning_class=name,
    )
    if "hook_layer" not in metadata and isinstance(layer, int):
        metadata["hook_layer"] = layer
    if name == "MatryoshkaBatchTopKSAE":
        metadata["matryoshka_group_sizes"] = [int(size) for size in state["group_sizes"].tolist()]
    if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE") and "k" in state:
        metadata["training_k"] = int(state["k"])
    config_out = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": weights_dtype(ours["W_enc"]),
        **options,
        "metadata": metadata,
    }
    return SAEFiles(config_out, ours)


def _hub_layout(path: str) -> HubLayout:
    return HubLayout(
        folder=path, required=(repo_path(path, WEIGHTS_FILENAME), repo_path(path, CONFIG_FILENAME))
    )


register_format(
    "dictionary_learning",
    _is_dictionary_learning_folder,
    read_dictionary_learning_folder,
    priority=30,
    hub_layout=_hub_layout,
)
