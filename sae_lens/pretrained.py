"""Loading what a user names as an SAE, and the model it belongs to.

- `load_sae(name, sae_id)`: a registry release, a Hugging Face repo id or a local folder in any
  known format (`SparseAutoencoder.from_pretrained`);
- `load_sae_group(path)`: every SAE under a folder (a folder of SAE folders, or one SAE folder);
- `load_model_and_sae(release, sae_id)`: the SAE and the model it was trained on, booted with the
  SAE's `model_from_pretrained_kwargs`;
- `LMSparseAutoencoderSessionloader(cfg).load_sae_training_group_session(path)`: the seed-era
  `(model, sae_group, activations_store)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_lens.errors import SAELensError
from sae_lens.sae_files import read_sae_folder, sae_folder_contents
from sae_lens.saes.sae import SAEConfig, SparseAutoencoder

# HookedTransformer.from_pretrained's weight-processing options: SAEs trained on a processed
# TransformerLens model need the bridge processed the same way to see the same activations.
WEIGHT_PROCESSING_OPTIONS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def load_sae(
    name: str, sae_id: str | None = None, device: str = "cpu", dtype: str | None = None
) -> SparseAutoencoder:
    """The SAE `name` (and `sae_id`) refers to: a registry release, a Hugging Face repo id, or a
    local folder in any known format (see `SparseAutoencoder.from_pretrained`)."""
    return SparseAutoencoder.from_pretrained(name, sae_id, device=device, dtype=dtype)


class SAEGroup:
    """SAEs loaded together, by name: the seed era's `SAEGroup` of a training run.

    Iterating gives the SAEs (as the seed's group did); `names`, `items()` and `group[name]` (or
    `group[i]`) give them by name.
    """

    def __init__(self, saes: dict[str, SparseAutoencoder]) -> None:
        if not saes:
            raise SAELensError("an SAE group needs at least one SAE")
        self.saes = dict(saes)

    @property
    def names(self) -> list[str]:
        """The SAEs' names (sub-folder names, or the folder's own name for a single SAE)."""
        return list(self.saes)

    @property
    def cfg(self) -> SAEConfig:
        """The first SAE's config (the seed era's `group.cfg`)."""
        return next(iter(self.saes.values())).cfg

    def items(self) -> list[tuple[str, SparseAutoencoder]]:
        """`(name, sae)` pairs."""
        return list(self.saes.items())

    def __getitem__(self, key: str | int) -> SparseAutoencoder:
        if isinstance(key, int):
            return list(self.saes.values())[key]
        if key not in self.saes:
            raise SAELensError(f"the group has no SAE {key!r}; it holds: {', '.join(self.saes)}")
        return self.saes[key]

    def __iter__(self) -> Iterator[SparseAutoencoder]:
        return iter(self.saes.values())

    def __len__(self) -> int:
        return len(self.saes)

    def __repr__(self) -> str:
        return f"SAEGroup({', '.join(self.saes)})"


def load_sae_group(path: str | Path, device: str | None = None, dtype: str | None = None) -> SAEGroup:
    """Every SAE under `path`: the SAE sub-folders (or files) of a folder that holds several, or
    the folder itself when it is one SAE."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SAELensError(f"SAE folder {str(folder)!r} does not exist (or is not a folder)")
    members = sae_folder_contents(folder)
    if not members:
        return SAEGroup({folder.name: SparseAutoencoder.load_from_disk(folder, device=device, dtype=dtype)})
    return SAEGroup(
        {
            member: SparseAutoencoder.from_files(
                read_sae_folder(folder, device, sae_id=member),
                str(folder / member),
                device=device,
                dtype=dtype,
            )
            for member in members
        }
    )


def boot_model(
    model_name: str,
    device: str = "cpu",
    dtype: str = "float32",
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
) -> Any:
    """The model an SAE belongs to, as a TransformerLens 4 bridge.

    With `model_from_pretrained_kwargs` (what SAELens recorded for SAEs trained on a
    `HookedTransformer`), the bridge runs in compatibility mode with the same weight processing
    (HookedTransformer's defaults, overridden by the kwargs), so its activations are the ones the
    SAE was trained on. Without them the model runs unprocessed, as this library trains.
    """
    from sae_lens.models import load_model

    model = load_model(model_name, device=device, dtype=dtype)
    if model_from_pretrained_kwargs is not None:
        processing = {
            key: bool(value)
            for key, value in model_from_pretrained_kwargs.items()
            if key in WEIGHT_PROCESSING_OPTIONS
        }
        model.enable_compatibility_mode(disable_warnings=True, **processing)
    return model


def load_model_and_sae(
    release: str,
    sae_id: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    model_dtype: str = "float32",
) -> tuple[Any, SparseAutoencoder]:
    """`(model, sae)`: the SAE (see `load_sae`) and the model named by its metadata, booted with
    its `model_from_pretrained_kwargs` (see `boot_model`)."""
    sae = load_sae(release, sae_id, device=device, dtype=dtype)
    model_name = sae.cfg.metadata.get("model_name")
    if not model_name:
        raise SAELensError(
            f"the SAE {release!r} names no model_name in its metadata; load the model yourself"
        )
    model = boot_model(model_name, device, model_dtype, sae.cfg.metadata.get("model_from_pretrained_kwargs"))
    return model, sae


class LMSparseAutoencoderSessionloader:
    """The seed era's session loader: a model, SAEs and an activations store from one config.

    `cfg` is a `LanguageModelSAERunnerConfig` (model, hook, dataset, context, device), or an SAE's
    own config, whose metadata supplies them.
    """

    def __init__(self, cfg: Any) -> None:
        if isinstance(cfg, SAEConfig):
            cfg = _runner_config_from_sae(cfg)
        self.cfg = cfg

    def get_model(self, model_name: str | None = None) -> Any:
        """The config's model (or `model_name`) as a bridge, on the config's device."""
        return boot_model(model_name or self.cfg.model_name, self.cfg.device, self.cfg.model_dtype)

    def load_sae_training_group_session(self, path: str | Path) -> tuple[Any, SAEGroup, Any]:
        """`(model, sae_group, activations_store)`: the config's model, the SAEs under `path` (a
        folder of SAE folders, or one SAE folder) and an `ActivationsStore` reading the config's
        dataset at its hook."""
        from sae_lens.activations_store import ActivationsStore

        group = load_sae_group(path, device=self.cfg.device)
        model = self.get_model()
        store = ActivationsStore.from_config(model, self.cfg)
        return model, group, store


def _runner_config_from_sae(cfg: SAEConfig) -> Any:
    from sae_lens.config import LanguageModelSAERunnerConfig

    meta = cfg.metadata
    if not meta.get("model_name") or not meta.get("hook_name"):
        raise SAELensError(
            "the SAE's metadata lacks model_name or hook_name; pass a LanguageModelSAERunnerConfig"
        )
    values: dict[str, Any] = {
        "model_name": meta["model_name"],
        "hook_point": meta["hook_name"],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "architecture": cfg.architecture,
        "device": cfg.device,
        "dtype": cfg.dtype,
    }
    for key, name in (
        ("dataset_path", "dataset_path"),
        ("context_size", "context_size"),
        ("prepend_bos", "prepend_bos"),
    ):
        if meta.get(key) is not None:
            values[name] = meta[key]
    return LanguageModelSAERunnerConfig(**values)


__all__ = [
    "LMSparseAutoencoderSessionloader",
    "SAEGroup",
    "boot_model",
    "load_model_and_sae",
    "load_sae",
    "load_sae_group",
]
