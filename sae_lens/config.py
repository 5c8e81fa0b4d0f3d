"""The training run's configuration: one dataclass that is the Python API, the CLI and the saved YAML.

`LanguageModelSAERunnerConfig` is a `TrainerConfig` (optimiser, schedule, dead latents, logging,
checkpoints) plus the model, the hook, the data and the SAE's shape. The SAE's own options (`k`,
`l1_coefficient`, `jumprelu_bandwidth`, ...) are declared once, by each architecture in its own file;
the runner config accepts them by name (`LanguageModelSAERunnerConfig(k=32)`, `k: 32` in YAML,
`sae-lens train --k 32`) and keeps them in `sae_options`, so no second list of them exists here.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sae_lens.config_fields import (
    check_known_fields,
    coerce_field,
    field_default,
    field_docs,
    field_types,
    non_negative_int,
    one_of,
    option,
    optional,
    positive_int,
    validate_fields,
)
from sae_lens.dtypes import DTYPES
from sae_lens.errors import SAELensError
from sae_lens.models import hook_layer_of
from sae_lens.saes import SAEConfig, get_architecture_class, registered_architectures
from sae_lens.training.config import TrainerConfig


def _known_architecture(name: str, value: Any) -> None:
    one_of(*registered_architectures())(name, value)


def _known_dtype(name: str, value: Any) -> None:
    one_of(*DTYPES)(name, value)


@dataclass(init=False)
class LanguageModelSAERunnerConfig(TrainerConfig):
    """Everything `language_model_sae_runner` needs to train one SAE on one hook point.

    The defaults are the CLI's main job: a TopK SAE (k=32, 16x) on layer 3 of the real
    all-MiniLM-L6-v2, trained on the embedded `builtin:python-docs` corpus in a few minutes on a CPU.
    Architecture options may be passed by name; see `sae_options`.
    """

    # --- model and hook ---
    model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Hugging Face hub name or local folder of the model to read activations from."""
    hook_point: str = "blocks.3.hook_resid_post"
    """TransformerLens hook name whose activations the SAE reconstructs."""
    hook_point_layer: int | None = option(None, optional(non_negative_int))
    """Block index of `hook_point`; inferred from the name (`blocks.N.`) when unset."""
    hook_point_head_index: int | None = option(None, optional(non_negative_int))
    """For per-head hooks such as `blocks.N.attn.hook_z`: train on this head only."""
    d_in: int | None = option(None, optional(positive_int))
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
    context_size: int = option(128, positive_int)
    """Tokens per packed row fed to the model."""
    prepend_bos: bool = True
    """Start every packed row with the model's BOS (or [CLS]) token, as the model saw in training."""
    exclude_special_tokens: bool = False
    """Drop activations at BOS/CLS/SEP/EOS positions from training and evaluation batches."""
    n_eval_sequences: int = option(32, non_negative_int)
    """Packed rows held out from the start of the stream for evaluation; never trained on."""
    use_cached_activations: bool = False
    """Train from activations cached on disk by `sae-lens cache` instead of running the model for every batch."""
    cached_activations_path: str | None = None
    """The activation cache (a folder written by `sae-lens cache`, or a saved HF dataset of activations)."""
    store_batch_size: int = option(32, positive_int)
    """Packed rows per model forward pass when filling the buffer."""
    n_batches_in_buffer: int = option(32, positive_int)
    """Buffer size in training batches; half of it is refilled at a time and shuffled."""

    # --- SAE ---
    architecture: str = option("topk", _known_architecture)
    """SAE architecture; one of the registered names (see `sae_lens.saes.registered_architectures()`)."""
    expansion_factor: int = option(16, positive_int)
    """d_sae = expansion_factor * d_in, unless `d_sae` is given."""
    d_sae: int | None = option(None, optional(positive_int))
    """Number of latents; overrides `expansion_factor`."""
    sae_options: dict[str, Any] = option(default_factory=dict)
    """The architecture's own options (`k`, `l1_coefficient`, ...; see the architecture pages). They can be given directly as keyword arguments, YAML keys or flags; those of other architectures are kept but unused."""
    hook_point_out: str | None = None
    """Train a transcoder: read `hook_point`, reconstruct this hook (e.g. `blocks.3.hook_mlp_out` from `blocks.3.hook_resid_mid`)."""
    sweep: dict[str, list[Any]] = option(default_factory=dict)
    """Lists of values (given as a list for any field or option: `k=[16, 32]`, `hook_point="blocks.*.hook_resid_post"` as a pattern): one SAE per combination, all trained from one model pass per batch."""
    distribute_saes: bool = False
    """Under torchrun, train each SAE of a sweep on one rank (on the batches of all ranks) instead of every SAE on every rank."""
    max_buffer_memory_mb: int | None = option(None, optional(positive_int))
    """Cap on the activation buffer (all hooks together); `n_batches_in_buffer` is lowered to fit (at least 2 batches)."""

    # --- logging and output ---
    log_to_wandb: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "sae_lens_training"
    """wandb project name."""
    run_name: str | None = None
    """Name of the run and of its output folder; generated when unset."""
    checkpoint_path: str = "checkpoints"
    """Folder under which the run's output folder is created."""
    resume_from_checkpoint: str | None = None
    """A `step_N` checkpoint folder to continue from exactly (its run folder receives the rest of the run)."""

    # --- run ---
    device: str = "cpu"
    """torch device for the model and the SAE (`cpu`, `cuda`, `cuda:1`, `mps`)."""
    seed: int = 42
    """Seed for the SAE's initialisation and the buffer's shuffling."""
    dtype: str = option("float32", _known_dtype)
    """dtype of the SAE's parameters (and of the activation buffer)."""
    model_dtype: str = option("float32", _known_dtype)
    """dtype the model runs in."""

    def __init__(self, **values: Any) -> None:
        """Set fields by name; any architecture's option (`k=32`) goes into `sae_options`, and a
        list given for a single-valued field or option (`lr=[1e-3, 3e-4]`) goes into `sweep`."""
        own = {f.name for f in dataclasses.fields(self)}
        options = dict(values.pop("sae_options", None) or {})
        sweep = dict(values.pop("sweep", None) or {})
        types_ = field_types(type(self))
        for key in list(values):
            if key not in types_:
                check_known_fields(type(self), {key: None})
            if isinstance(values[key], (list, tuple)) and not _is_list_type(types_[key]):
                if not values[key]:
                    raise SAELensError(f"{key} is an empty list; give one value or a list to sweep over")
                sweep[key] = list(values[key])
                values[key] = sweep[key][0]
            if key not in own:
                options[key] = values.pop(key)
        for field in dataclasses.fields(self):
            setattr(self, field.name, values[field.name] if field.name in values else field_default(field))
        self.sae_options = options
        self.sweep = sweep
        self.__post_init__()

    def __post_init__(self) -> None:
        _known_architecture("architecture", self.architecture)
        # The chosen architecture's defaults, so that equal configs compare equal however written.
        self.sae_options = {**self.architecture_config_class().option_defaults(), **self.sae_options}
        self.validate()

    def __getattr__(self, name: str) -> Any:
        # Seed-era access to architecture options: `cfg.k`, `cfg.l1_coefficient`.
        options = self.__dict__.get("sae_options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no field or architecture option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # `cfg.k = 16` sets the option, as in the seed era.
        if name not in self.__dataclass_fields__ and name in _all_option_types():
            self.sae_options[name] = value
            return
        super().__setattr__(name, value)

    # -- derived values -------------------------------------------------------------------------

    @property
    def hook_layer(self) -> int:
        """The block index of the hook point (the model stops after this block)."""
        if self.hook_point_layer is not None:
            return self.hook_point_layer
        layer = hook_layer_of(self.hook_point)
        # Embedding hooks (the validator admits no other names without a block) sit before block 0.
        return layer if layer is not None else 0

    def resolved_d_sae(self, d_in: int) -> int:
        """d_sae, or expansion_factor * d_in when unset."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_in

    def architecture_config_class(self) -> type[SAEConfig]:
        """The config dataclass of `architecture`."""
        return get_architecture_class(self.architecture).config_class

    def sae_config(self, d_in: int | None = None, d_out: int | None = None) -> SAEConfig:
        """The SAE part of this config, for the architecture it names; `d_in` fills in a config that
        left it unset, `d_out` is a transcoder's output width. Options of other architectures are
        left out."""
        d_in = d_in if d_in is not None else self.d_in
        if d_in is None:
            raise SAELensError("d_in is unset; set it in the config or let the runner infer it")
        config_class = self.architecture_config_class()
        used = {
            name: value for name, value in self.sae_options.items() if name in config_class.option_names()
        }
        transcoder = self.hook_point_out is not None and self.hook_point_out != self.hook_point
        if transcoder:
            # A transcoder's b_dec lives in the output space, so it is never subtracted from the input.
            used["apply_b_dec_to_input"] = False
        return config_class(
            d_in=d_in,
            d_sae=self.resolved_d_sae(d_in),
            d_out=d_out if transcoder else None,
            dtype=self.dtype,
            device=self.device,
            metadata={
                "model_name": self.model_name,
                "hook_name": self.hook_point,
                **({"hook_name_out": self.hook_point_out} if transcoder else {}),
                "hook_layer": self.hook_layer,
                "hook_head_index": self.hook_point_head_index,
                "context_size": self.context_size,
                "prepend_bos": self.prepend_bos,
                "exclude_special_tokens": self.exclude_special_tokens,
                "dataset_path": self.dataset_path,
            },
            **used,
        )

    # -- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Reject values that cannot work, naming the field and what it accepts."""
        super().validate()
        validate_fields(self)
        # Each option by the check of the architecture that declares it (the chosen one first); the
        # checks that need d_sae (k <= d_sae) run once d_sae is known.
        checks = {
            **_option_checks(tuple(registered_architectures())),
            **_checks_of(self.architecture_config_class()),
        }
        for name, value in self.sae_options.items():
            if name not in checks:
                check_known_fields(type(self), {name: value})
            elif checks[name] is not None:
                checks[name](name, value)
        if self.d_sae is not None or self.d_in is not None:
            self.sae_config(self.d_in or 1)
        if (
            self.hook_point_layer is None
            and hook_layer_of(self.hook_point) is None
            and not self.hook_point.startswith(("embed", "pos_embed", "hook_embed"))
            and not is_hook_pattern(self.hook_point)
        ):
            raise SAELensError(
                f"hook_point {self.hook_point!r} does not name a block (blocks.N....); "
                "set hook_point_layer to the block it belongs to"
            )

    # -- dict / YAML ----------------------------------------------------------------------------

    @classmethod
    def extra_field_types(cls) -> dict[str, Any]:
        """Every registered architecture's options and their types (for `coerce_field` and the CLI)."""
        return _all_option_types()

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values, with the architecture options flattened in and swept
        names holding their lists (the form `from_dict` and the YAML take)."""
        values = dataclasses.asdict(self)
        flat = {key: value for key, value in values.items() if key not in ("sae_options", "sweep")}
        return {**flat, **values["sae_options"], **values["sweep"]}

    def expand(self) -> list[LanguageModelSAERunnerConfig]:
        """The single-SAE configs of a sweep (itself when there is no sweep), each validated.

        Combinations that differ only in options their architecture does not use are one SAE.
        Hook patterns (`blocks.*.hook_resid_post`) are expanded later, against the model's hooks.
        """
        if not self.sweep:
            return [self]
        names = list(self.sweep)
        base = {key: value for key, value in self.to_dict().items() if key not in names}
        configs: dict[str, LanguageModelSAERunnerConfig] = {}
        for combination in itertools.product(*(self.sweep[name] for name in names)):
            single = type(self)(**base, **dict(zip(names, combination, strict=True)))
            configs.setdefault(single.identity(), single)
        return list(configs.values())

    def identity(self) -> str:
        """What makes two single-SAE configs train the same SAE: the fields, and only the options
        the architecture uses."""
        used = set(self.architecture_config_class().option_names())
        values = {
            key: value for key, value in self.to_dict().items() if key in _runner_field_names() or key in used
        }
        return repr(sorted(values.items()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LanguageModelSAERunnerConfig:
        """Build from a dict, rejecting unknown keys with the closest valid field suggested. A list
        for a single-valued field is a sweep; each of its values is converted."""
        check_known_fields(cls, values)
        types_ = field_types(cls)
        converted = {}
        for name, value in values.items():
            if isinstance(value, (list, tuple)) and not _is_list_type(types_[name]):
                converted[name] = [coerce_field(cls, name, item) for item in value]
            else:
                converted[name] = coerce_field(cls, name, value)
        return cls(**converted)

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as YAML (atomically)."""
        from sae_lens.atomic_files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

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


def is_hook_pattern(hook_point: str) -> bool:
    """Whether a hook name is a pattern to expand against the model's hooks (`blocks.*.hook_z`)."""
    return any(character in hook_point for character in "*?[")


def _is_list_type(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(annotation))


def _runner_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(LanguageModelSAERunnerConfig)} - {"sae_options", "sweep"}


def _checks_of(config_class: type[SAEConfig]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    return {name: fields[name].metadata.get("check") for name in config_class.option_names()}


@functools.lru_cache(maxsize=4)
def _option_checks(architectures: tuple[str, ...]) -> dict[str, Any]:
    """Each option's check, from the first architecture (alphabetically) that declares it."""
    checks: dict[str, Any] = {}
    for name in reversed(architectures):
        checks.update(_checks_of(get_architecture_class(name).config_class))
    return checks


def _all_option_types() -> dict[str, Any]:
    """Every registered architecture's options and their annotations (the first declaration wins)."""
    return _option_types(tuple(registered_architectures()))


@functools.lru_cache(maxsize=4)
def _option_types(architectures: tuple[str, ...]) -> dict[str, Any]:
    types_: dict[str, Any] = {}
    for name in architectures:
        config_class = get_architecture_class(name).config_class
        hints = typing.get_type_hints(config_class)
        for option_name in config_class.option_names():
            types_.setdefault(option_name, hints[option_name])
    return types_


def architecture_option_docs() -> dict[str, dict[str, tuple[str, Any]]]:
    """The SAE options, grouped: `"all architectures"` (those of `SAEConfig` itself), then each
    architecture's own, as `{name: (docstring, default)}` (for `--help` and the configuration page)."""
    shared = set(SAEConfig.option_names())
    groups: dict[str, dict[str, tuple[str, Any]]] = {"all architectures": {}}
    for name in registered_architectures():
        config_class = get_architecture_class(name).config_class
        text, defaults = field_docs(config_class), config_class.option_defaults()
        for option_name in config_class.option_names():
            group = "all architectures" if option_name in shared else name
            groups.setdefault(group, {})[option_name] = (text.get(option_name, ""), defaults[option_name])
    return groups


__all__ = [
    "LanguageModelSAERunnerConfig",
    "architecture_option_docs",
    "check_known_fields",
    "coerce_field",
    "field_docs",
]
