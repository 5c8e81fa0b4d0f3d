"""The training run's configuration: one dataclass that is the Python API, the CLI and the saved YAML.

Every field carries a docstring right under it; `sae-lens train --help` prints those docstrings, so
this file is the single place where an option is defined, defaulted and explained.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from sae_lens.errors import SAELensError

LR_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")
B_DEC_INIT_METHODS = ("geometric_median", "mean", "zeros")
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in")
DTYPES = ("float32", "float64", "bfloat16", "float16")
_HOOK_LAYER_PATTERN = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LanguageModelSAERunnerConfig:
    """Everything `language_model_sae_runner` needs to train one SAE on one hook point.

    The defaults are the CLI's main job: a TopK SAE (k=32, 16x) on layer 3 of the real
    all-MiniLM-L6-v2, trained on the embedded `builtin:python-docs` corpus in a few minutes on a CPU.
    """

    # --- model and hook ---
    model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Hugging Face hub name or local folder of the model to read activations from."""
    hook_point: str = "blocks.3.hook_resid_post"
    """TransformerLens hook name whose activations the SAE reconstructs."""
    hook_point_layer: int | None = None
    """Block index of `hook_point`; inferred from the name (`blocks.N.`) when unset."""
    hook_point_head_index: int | None = None
    """For per-head hooks such as `blocks.N.attn.hook_z`: train on this head only."""
    d_in: int | None = None
    """Width of the activations; inferred from the model when unset, and checked when set."""

    # --- data ---
    dataset_path: str = "builtin:python-docs"
    """`builtin:python-docs`, a hub dataset, a `save_to_disk` folder, or a .txt/.jsonl/.parquet file."""
    dataset_split: str = "train"
    """Split to read when the dataset has several."""
    is_dataset_tokenized: bool | None = None
    """Whether rows are token ids; detected from the column (`tokens`/`input_ids` vs `text`) when unset."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole."""
    context_size: int = 128
    """Tokens per packed row fed to the model."""
    prepend_bos: bool = True
    """Start every packed row with the model's BOS (or [CLS]) token, as the model saw in training."""
    exclude_special_tokens: bool = False
    """Drop activations at BOS/CLS/SEP/EOS positions from training and evaluation batches."""
    n_eval_sequences: int = 32
    """Packed rows held out from the start of the stream for evaluation; never trained on."""

    # --- SAE shape ---
    architecture: str = "topk"
    """SAE architecture; one of the registered names (see `sae_lens.saes.registered_architectures()`)."""
    expansion_factor: int = 16
    """d_sae = expansion_factor * d_in, unless `d_sae` is given."""
    d_sae: int | None = None
    """Number of latents; overrides `expansion_factor`."""
    k: int = 32
    """Active latents per token, for TopK-style architectures."""
    b_dec_init_method: str = "geometric_median"
    """How to initialise the decoder bias: geometric_median, mean or zeros."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding."""
    normalize_activations: str = "none"
    """`expected_average_only_in` scales inputs to norm sqrt(d_in) in training and folds it into the weights on save."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss (TopK); defaults to d_in // 2."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the AuxK loss (TopK family)."""
    decoder_init_norm: float | None = None
    """Norm of the decoder rows at initialisation; unit norm when unset."""
    topk_threshold_lr: float = 0.01
    """BatchTopK: EMA rate of the inference threshold (the smallest kept activation)."""
    jumprelu_init_threshold: float = 0.001
    """JumpReLU: initial per-latent threshold."""
    jumprelu_bandwidth: float = 0.001
    """JumpReLU: width of the straight-through estimator's rectangle kernel."""
    jumprelu_sparsity_loss_mode: str = "step"
    """JumpReLU: `step` (L0) or `tanh` (smooth L0) sparsity penalty."""
    jumprelu_tanh_scale: float = 4.0
    """JumpReLU: scale inside tanh for the `tanh` penalty."""
    target_l0: float | None = None
    """JumpReLU: when set, the penalty is l1_coefficient * (L0 / target_l0 - 1)^2 instead."""
    matryoshka_widths: list[int] | None = None
    """Matryoshka: nested prefix widths (ascending, last = d_sae); each prefix reconstructs alone."""

    # --- optimiser ---
    lr: float = 1e-3
    """Adam learning rate."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    lr_scheduler_name: str = "constant"
    """constant, cosineannealing or cosineannealingwarmrestarts."""
    lr_warm_up_steps: int = 0
    """Steps of linear warm-up from 0 to `lr`."""
    lr_end: float | None = None
    """Final LR of the cosine schedules; defaults to lr / 10."""
    n_restart_cycles: int = 1
    """Cycles of `cosineannealingwarmrestarts`."""
    l1_coefficient: float = 1e-3
    """Weight of the sparsity penalty: L1 for standard and gated, L0 for jumprelu; unused by TopK."""
    l1_warm_up_steps: int = 0
    """Steps over which the sparsity penalty ramps up linearly from 0."""
    lp_norm: float = 1.0
    """p of the sparsity penalty's norm (1 is L1)."""

    # --- batching ---
    train_batch_size: int = 1024
    """Activations (tokens) per optimiser step."""
    store_batch_size: int = 32
    """Packed rows per model forward pass when filling the buffer."""
    n_batches_in_buffer: int = 32
    """Buffer size in training batches; half of it is refilled at a time and shuffled."""
    total_training_tokens: int = 300_000
    """Training stops after this many activations."""

    # --- dead features ---
    feature_sampling_window: int = 200
    """Steps between logs of the feature-density histogram."""
    dead_feature_window: int = 50
    """A latent that has not fired for this many steps is dead (ghost grads and AuxK act on it)."""
    dead_feature_window_tokens: int | None = None
    """The same window in tokens (e.g. 10_000_000 as in the TopK papers); overrides the step count."""
    dead_feature_threshold: float = 1e-8
    """Density below which a latent counts as dead in the logged dead fraction."""
    use_ghost_grads: bool = False
    """Ghost grads for dead latents (standard SAE)."""

    # --- logging ---
    log_to_wandb: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "sae_lens_training"
    """wandb project name."""
    run_name: str | None = None
    """Name of the run and of its output folder; generated when unset."""
    wandb_log_frequency: int = 10
    """Steps between metric logs (wandb and metrics.jsonl)."""
    eval_every_n_wandb_logs: int = 10
    """Logs between evaluations on the held-out rows."""

    # --- checkpoints and output ---
    checkpoint_path: str = "checkpoints"
    """Folder under which the run's output folder is created."""
    n_checkpoints: int = 0
    """Intermediate checkpoints, evenly spaced; the final SAE is always saved."""

    # --- run ---
    device: str = "cpu"
    """torch device for the model and the SAE (`cpu`, `cuda`, `cuda:1`, `mps`)."""
    seed: int = 42
    """Seed for the SAE's initialisation and the buffer's shuffling."""
    dtype: str = "float32"
    """dtype of the SAE's parameters."""
    model_dtype: str = "float32"
    """dtype the model runs in."""
    autocast: bool = False
    """Run the SAE's training forward and backward under torch.autocast in bfloat16 (weights and Adam stay in `dtype`)."""
    cpu_reuse_freed_memory: bool | None = None
    """On CPU with glibc, keep freed memory for reuse during training instead of page-faulting it back every step (`sae_lens.cpu_memory`; restored when training ends). Unset: on for standard and the TopK family; off for jumprelu and gated, whose many dense `[batch, d_sae]` temporaries fragment the kept memory (about 1.8x faster, but twice the peak memory)."""

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values -------------------------------------------------------------------------

    @property
    def hook_layer(self) -> int:
        """The block index of the hook point (the model stops after this block)."""
        if self.hook_point_layer is not None:
            return self.hook_point_layer
        match = _HOOK_LAYER_PATTERN.match(self.hook_point)
        # Embedding hooks (the validator admits no other names without a block) sit before block 0.
        return int(match.group(1)) if match else 0

    def resolved_d_sae(self, d_in: int) -> int:
        """d_sae, or expansion_factor * d_in when unset."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_in

    @property
    def dead_window_steps(self) -> int:
        """Steps without firing after which a latent counts as dead."""
        if self.dead_feature_window_tokens is not None:
            return max(1, -(-self.dead_feature_window_tokens // self.train_batch_size))
        return self.dead_feature_window

    @property
    def total_training_steps(self) -> int:
        """Optimiser steps in the run."""
        return max(1, self.total_training_tokens // self.train_batch_size)

    # -- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Reject values that cannot work, naming the field and what it accepts."""
        positive_ints = (
            "context_size",
            "expansion_factor",
            "k",
            "train_batch_size",
            "store_batch_size",
            "n_batches_in_buffer",
            "total_training_tokens",
            "feature_sampling_window",
            "dead_feature_window",
            "wandb_log_frequency",
            "eval_every_n_wandb_logs",
            "n_restart_cycles",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SAELensError(f"{name} must be a positive integer, got {value!r}")
        for name in ("d_in", "d_sae", "aux_k", "dead_feature_window_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise SAELensError(f"{name} must be a positive integer or unset, got {value!r}")
        for name in ("lr_warm_up_steps", "l1_warm_up_steps", "n_checkpoints", "n_eval_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SAELensError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise SAELensError(f"lr must be positive, got {self.lr!r}")
        if self.lr_end is not None and self.lr_end < 0:
            raise SAELensError(f"lr_end must be non-negative, got {self.lr_end!r}")
        for name in ("l1_coefficient", "aux_k_coefficient", "dead_feature_threshold"):
            if getattr(self, name) < 0:
                raise SAELensError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if not self.lp_norm > 0:
            raise SAELensError(f"lp_norm must be positive, got {self.lp_norm!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise SAELensError("adam_beta1 and adam_beta2 must be in [0, 1)")
        _check_choice("lr_scheduler_name", self.lr_scheduler_name, LR_SCHEDULERS)
        _check_choice("b_dec_init_method", self.b_dec_init_method, B_DEC_INIT_METHODS)
        _check_choice("normalize_activations", self.normalize_activations, NORMALIZE_ACTIVATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("model_dtype", self.model_dtype, DTYPES)
        # Imported here because the architecture registry imports this module's neighbours.
        from sae_lens.saes import get_architecture_class, registered_architectures

        _check_choice("architecture", self.architecture, tuple(registered_architectures()))
        if (
            get_architecture_class(self.architecture).uses_k
            and self.d_sae is not None
            and self.k > self.d_sae
        ):
            raise SAELensError(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        _check_choice("jumprelu_sparsity_loss_mode", self.jumprelu_sparsity_loss_mode, ("step", "tanh"))
        if self.target_l0 is not None and not self.target_l0 > 0:
            raise SAELensError(f"target_l0 must be positive or unset, got {self.target_l0!r}")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "topk_threshold_lr"):
            if not getattr(self, name) > 0:
                raise SAELensError(f"{name} must be positive, got {getattr(self, name)!r}")
        if (
            self.hook_point_layer is None
            and not _HOOK_LAYER_PATTERN.match(self.hook_point)
            and not self.hook_point.startswith(("embed", "pos_embed", "hook_embed"))
        ):
            raise SAELensError(
                f"hook_point {self.hook_point!r} does not name a block (blocks.N....); "
                "set hook_point_layer to the block it belongs to"
            )

    # -- dict / YAML ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LanguageModelSAERunnerConfig:
        """Build from a dict, rejecting unknown keys with the closest valid field suggested."""
        check_known_fields(cls, values)
        return cls(**{name: coerce_field(cls, name, value) for name, value in values.items()})

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
        """Read a YAML file written by `to_yaml` (or by hand); `overrides` win over the file."""
        path = Path(path)
        if not path.is_file():
            raise SAELensError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            first_line = str(error).splitlines()[0]
            raise SAELensError(f"config file {str(path)!r} is not valid YAML: {first_line}") from None
        if not isinstance(loaded, dict):
            raise SAELensError(f"config file {str(path)!r} must hold a mapping of field: value")
        return cls.from_dict({**loaded, **overrides})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SAELensError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_known_fields(cls: type, values: dict[str, Any]) -> None:
    """Raise SAELensError for a key that is not a field of dataclass `cls`, suggesting the closest."""
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SAELensError(f"unknown config key {key!r}{hint}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of each field of dataclass `cls`."""
    return typing.get_type_hints(cls)


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """Convert `value` (from YAML or the command line) to field `name`'s type, or explain why not."""
    annotation = field_types(cls)[name]
    allowed = _unwrap_optional(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in typing.get_args(annotation):
            return None
        # "none" is a real value of some str fields (normalize_activations), not an empty one.
        if value is None or allowed is not str:
            raise SAELensError(f"{name} cannot be empty")
    try:
        if allowed is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if allowed is int:
            number = float(value) if isinstance(value, str) else value  # "1e6" ok; "1.5" not 1
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if allowed is float:
            return float(value)
        if allowed is str:
            return str(value)
        if typing.get_origin(allowed) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [int(item) for item in items]
    except (TypeError, ValueError):
        type_name = getattr(allowed, "__name__", str(allowed))
        raise SAELensError(f"{name} must be a {type_name}, got {value!r}") from None
    return value


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    if typing.get_origin(annotation) is Literal:
        return str
    return annotation


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs


__all__ = ["LanguageModelSAERunnerConfig", "check_known_fields", "coerce_field", "field_docs"]
