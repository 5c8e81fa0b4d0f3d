"""Activations cached on disk: `cache_activations_runner` writes them once, `CachedActivationsStore`
trains from them as often as you like, without running the model.

A cache is a folder::

    manifest.json            what the cache holds (model, hooks and widths, dtype, context size,
                             shards with token counts and sha256 checksums, held-out token rows,
                             the dataset position reached, the library version)
    eval.safetensors         the held-out rows: `tokens` [n_eval, context] and each hook's
                             activations of their kept tokens [n_eval_tokens, d_hook]
    shard_00000.safetensors  each hook's activations [n_tokens, d_hook], and for the same positions
    shard_00001.safetensors  `token_ids`, `positions` (index in the row) and `row_ids` (packed row
    ...                      of the stream), all [n_tokens] int64

Shards hold whole packed rows, in stream order. Every file is written atomically and the manifest
is rewritten (atomically) after each shard, listing only complete shards and the dataset position
after the last one; an interrupted run restarts from there and produces the same shards as one
that never stopped. The reader also accepts a Hugging Face dataset of activations (saved with
`save_to_disk`, one list-of-floats column per hook, one row per token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_safetensors
from tqdm.auto import tqdm

from sae_lens import distributed
from sae_lens.activations_store import ActivationsStore
from sae_lens.atomic_files import atomic_write_bytes, atomic_write_text, ensure_writable_folder
from sae_lens.config_fields import (
    check_known_fields,
    coerce_field,
    non_negative_int,
    one_of,
    option,
    optional,
    positive_int,
    validate_fields,
)
from sae_lens.dtypes import DTYPES, torch_dtype
from sae_lens.errors import SAELensError
from sae_lens.models import MINILM_ALIASES, check_context_fits, check_fits_model, hook_layer_of, load_model
from sae_lens.shuffle_buffer import DatasetExhausted, ShuffleBufferServing
from sae_lens.text_datasets import detect_column, load_text_dataset

if typing.TYPE_CHECKING:
    from sae_lens.config import LanguageModelSAERunnerConfig

MANIFEST_FILENAME = "manifest.json"
EVAL_FILENAME = "eval.safetensors"
FORMAT_NAME = "sae_lens.activation_cache"
FORMAT_VERSION = 1
META_KEYS = ("token_ids", "positions", "row_ids")
"""Per-token tensors a shard holds besides the hooks' activations."""
HASH_CHUNK_BYTES = 8 << 20
ARROW_ROWS_PER_SHARD = 65_536
"""An HF dataset is read as consecutive blocks of this many rows, shuffled like shards."""

# The config fields a resumed cache run must share with the run that started it: they decide the
# shards' contents. total_training_tokens may grow (the cache is extended); store_batch_size and
# device only change how the same activations are computed.
CONTENT_FIELDS = (
    "model_name",
    "hook_points",
    "dataset_path",
    "dataset_split",
    "streaming",
    "context_size",
    "prepend_bos",
    "exclude_special_tokens",
    "shard_size_tokens",
    "dtype",
    "model_dtype",
    "n_eval_sequences",
    "seed",
)


# -- configuration ----------------------------------------------------------------------------------


def _hook_list(name: str, value: Any) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(h, str) and h for h in value):
        raise SAELensError(f"{name} must be a non-empty list of hook names, got {value!r}")
    if len(set(value)) != len(value):
        raise SAELensError(f"{name} lists a hook twice: {value!r}")


def _known_dtype(name: str, value: Any) -> None:
    one_of(*DTYPES)(name, value)


@dataclass
class CacheActivationsRunnerConfig:
    """What `cache_activations_runner` (and `sae-lens cache`) writes: a model's activations at one or
    more hooks over a dataset, packed exactly as training packs them. Fields that mean the same as in
    `LanguageModelSAERunnerConfig` have the same names."""

    model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Hugging Face hub name or local folder of the model to read activations from."""
    hook_points: list[str] = option(default_factory=lambda: ["blocks.3.hook_resid_post"], check=_hook_list)
    """Hooks to cache, all from one forward pass (comma-separated on the command line)."""
    dataset_path: str = "builtin:python-docs"
    """`builtin:python-docs`, a hub dataset, a `save_to_disk` folder, or a .txt/.jsonl/.parquet file."""
    dataset_split: str = "train"
    """Split to read when the dataset has several."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole."""
    context_size: int = option(128, positive_int)
    """Tokens per packed row fed to the model."""
    prepend_bos: bool = True
    """Start every packed row with the model's BOS (or [CLS]) token, as the model saw in training."""
    exclude_special_tokens: bool = False
    """Leave out activations at BOS/CLS/SEP/EOS positions (padding is always left out)."""
    store_batch_size: int = option(32, positive_int)
    """Packed rows per model forward pass."""
    total_training_tokens: int = option(300_000, positive_int)
    """Activations (tokens) to cache; fewer if the dataset ends first. Rerun with more to extend a cache."""
    shard_size_tokens: int = option(65_536, positive_int)
    """Tokens per shard file, rounded up to whole rows (65,536 x 384 float32 is 100 MB); memory while writing is about three shards."""
    dtype: str = option("float32", _known_dtype)
    """dtype the activations are stored in (and served to the SAE in)."""
    model_dtype: str = option("float32", _known_dtype)
    """dtype the model runs in."""
    device: str = "cpu"
    """torch device for the model (`cpu`, `cuda`, `cuda:1`, `mps`)."""
    cached_activations_path: str = "activation_cache"
    """The cache folder to write (created if needed; an interrupted cache there is resumed)."""
    n_eval_sequences: int = option(32, non_negative_int)
    """Packed rows held out from the start of the stream for evaluation (saved with their activations); never in a shard."""
    seed: int | None = option(None, optional(non_negative_int))
    """Shuffle the documents with this seed before packing; unset: dataset order, as training reads it."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that cannot work, naming the field."""
        validate_fields(self)

    @property
    def rows_per_shard(self) -> int:
        """Packed rows per shard: `shard_size_tokens` rounded up to whole rows."""
        return math.ceil(self.shard_size_tokens / self.context_size)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values (the form `from_dict`, YAML and the manifest use)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CacheActivationsRunnerConfig:
        """Build from a dict of field values (strings from YAML or flags are converted); unknown keys
        are refused with the closest field suggested."""
        check_known_fields(cls, values)
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name == "hook_points":
                items = value.split(",") if isinstance(value, str) else value
                converted[name] = [str(item).strip() for item in items] if isinstance(items, list) else items
            else:
                converted[name] = coerce_field(cls, name, value)
        return cls(**converted)


# -- files ------------------------------------------------------------------------------------------


def library_version() -> str:
    """The installed sae-lens version (recorded in every manifest)."""
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_key(model_name: str) -> str:
    """The name two caches of one model agree on: the MiniLM aliases are one name, a local folder
    its absolute path, anything else (a hub name) as given."""
    if model_name in MINILM_ALIASES:
        return MINILM_ALIASES[0]
    path = Path(model_name).expanduser()
    return str(path.resolve()) if path.exists() else model_name


def shard_filename(index: int) -> str:
    """`shard_00007.safetensors`."""
    return f"shard_{index:05d}.safetensors"


def write_safetensors_checked(
    folder: Path, filename: str, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Write `tensors` to `folder/filename` atomically; returns the manifest entry of the file
    (`file`, `n_bytes`, `sha256`, and `n_tokens`: the first dimension of the first tensor)."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    data = serialize_safetensors(contiguous, metadata={"format": FORMAT_NAME})
    atomic_write_bytes(folder / filename, data)
    first = next(iter(contiguous.values()))
    return {
        "file": filename,
        "n_tokens": int(first.shape[0]),
        "n_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def new_manifest(
    *,
    model_name: str | None,
    hook_widths: dict[str, int],
    dtype: str,
    context_size: int | None,
    config: dict[str, Any] | None = None,
    eval_tokens: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The manifest of an empty cache; `write_safetensors_checked` entries go into `shards`."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sae_lens_version": library_version(),
        "model_name": model_key(model_name) if model_name else None,
        "hook_points": list(hook_widths),
        "hook_widths": dict(hook_widths),
        "dtype": dtype,
        "context_size": context_size,
        "n_tokens": 0,
        "n_rows": 0,
        "shards": [],
        "eval": None,
        "eval_tokens": eval_tokens.tolist() if eval_tokens is not None else None,
        "position": {"rows_consumed": 0, "pending": []},
        "complete": False,
        "dataset_exhausted": False,
        "config": config or {},
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` atomically (readers see the old one or the new one, never half)."""
    atomic_write_text(Path(folder) / MANIFEST_FILENAME, manifest_text(manifest))


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as indented JSON, with the token lists (held-out rows, pending tokens) one
    compact line per row instead of one line per token."""
    compact: dict[str, str] = {}

    def placeholder(value: Any) -> str:
        key = f"@compact-{uuid.uuid4().hex}@"
        compact[f'"{key}"'] = json.dumps(value, separators=(",", ":"))
        return key

    shown = dict(manifest)
    if shown.get("eval_tokens"):
        shown["eval_tokens"] = [placeholder(row) for row in shown["eval_tokens"]]
    if shown.get("position"):
        shown["position"] = {**shown["position"], "pending": placeholder(shown["position"]["pending"])}
    text = json.dumps(shown, indent=1)
    for key, value in compact.items():
        text = text.replace(key, value)
    return text + "\n"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the cache folder `path`; SAELensError when the folder or manifest is missing
    or unreadable."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SAELensError(
            f"activation cache {str(path)!r} does not exist; write one with "
            f"sae-lens cache --cached_activations_path {path}"
        )
    manifest_path = folder / MANIFEST_FILENAME
    if not manifest_path.is_file():
        raise SAELensError(
            f"{str(path)!r} holds no {MANIFEST_FILENAME}: it is not an activation cache written by "
            "sae-lens cache (nor a saved Hugging Face dataset)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SAELensError(
            f"{manifest_path} is not valid JSON ({error}); delete the cache and write it again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SAELensError(f"{manifest_path} is not an activation cache manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SAELensError(
            f"{manifest_path} has format version {manifest['format_version']}, newer than this sae-lens "
            f"reads ({FORMAT_VERSION}); upgrade sae-lens"
        )
    return manifest


def check_cache_matches(
    manifest: dict[str, Any],
    *,
    model_name: str | None = None,
    hooks: Sequence[str] | None = None,
    d_in: int | None = None,
    dtype: str | None = None,
    path: str | Path | None = None,
) -> None:
    """Raise a one-line SAELensError when the cache is not what training expects.

    Each argument that is given is checked: the model the activations came from, that every hook is
    cached, that the first hook's width is `d_in`, and the stored dtype. A cache that does not record
    the model (an HF dataset) passes the model check.
    """
    where = f"activation cache {str(path)!r}" if path is not None else "the activation cache"
    cached_model = manifest.get("model_name")
    if model_name is not None and cached_model is not None and model_key(model_name) != cached_model:
        raise SAELensError(
            f"{where} holds activations of model {cached_model!r}, not {model_name!r}; set model_name "
            f"to {cached_model!r} or cache {model_name!r} with sae-lens cache"
        )
    widths: dict[str, int] = manifest["hook_widths"]
    for hook in hooks or []:
        if hook not in widths:
            raise SAELensError(
                f"{where} has no activations of hook {hook!r} (it holds {', '.join(widths)}); "
                f"cache that hook with sae-lens cache --hook_points {hook}"
            )
    if d_in is not None:
        first = hooks[0] if hooks else next(iter(widths))
        if widths[first] != d_in:
            raise SAELensError(
                f"{where} holds {first} activations of width {widths[first]}, not d_in={d_in}; "
                "fix d_in or leave it unset"
            )
    if dtype is not None and manifest["dtype"] != dtype:
        raise SAELensError(
            f"{where} holds {manifest['dtype']} activations, but dtype is {dtype}; set dtype to "
            f"{manifest['dtype']} or cache again with --dtype {dtype}"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(folder: Path, entry: dict[str, Any], verify_checksum: bool) -> Path:
    """The path of a listed file, after checking it exists, has its listed size and (optionally) checksum."""
    path = folder / entry["file"]
    hint = "the cache is damaged; delete it and run sae-lens cache again"
    if not path.is_file():
        raise SAELensError(f"{path} is missing; {hint}")
    size = path.stat().st_size
    if size != entry["n_bytes"]:
        state = "truncated" if size < entry["n_bytes"] else "longer than written"
        raise SAELensError(f"{path} is {state} ({size} of {entry['n_bytes']} bytes); {hint}")
    if verify_checksum and _file_sha256(path) != entry["sha256"]:
        raise SAELensError(f"{path} is corrupt (its sha256 checksum does not match the manifest); {hint}")
    return path


def verify_cache(path: str | Path) -> dict[str, Any]:
    """Check every listed file of a cache (size and sha256); returns the manifest."""
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    for entry in [*manifest["shards"], *([manifest["eval"]] if manifest.get("eval") else [])]:
        _check_file(folder, entry, verify_checksum=True)
    return manifest


# -- writing ------------------------------------------------------------------------------------------


def cache_activations_runner(
    cfg: CacheActivationsRunnerConfig,
    *,
    model: Any = None,
    show_progress: bool = True,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Write the activations `cfg` describes to `cfg.cached_activations_path`; returns the manifest.

    A folder holding an unfinished cache of the same settings is resumed from its last complete
    shard (a larger `total_training_tokens` extends a finished one). `model` is a loaded
    TransformerBridge to use instead of loading `cfg.model_name`. `on_shard(index, manifest)` runs
    after each shard is committed.

    Every check that needs no model runs first: the config, the output folder, the dataset, and
    that the context and hooks fit the model.
    """
    cfg.validate()
    folder = ensure_writable_folder(cfg.cached_activations_path, "cached_activations_path")
    manifest = _resumable_manifest(folder, cfg)
    _remove_unlisted_files(folder, manifest)
    if manifest is not None and _finished(manifest, cfg):
        return manifest
    dataset = load_text_dataset(
        cfg.dataset_path, split=cfg.dataset_split, streaming=cfg.streaming, seed=cfg.seed
    )
    column, is_tokenized = detect_column(dataset)
    if model is None:
        layers = [hook_layer_of(hook) for hook in cfg.hook_points]
        deepest = max((layer for layer in layers if layer is not None), default=None)
        check_fits_model(cfg.model_name, cfg.context_size, deepest)
        model = load_model(cfg.model_name, device=cfg.device, dtype=cfg.model_dtype)
    else:
        check_context_fits(model, cfg.context_size)

    store = ActivationsStore(
        model,
        dataset,
        hook_points=cfg.hook_points,
        context_size=cfg.context_size,
        train_batch_size=cfg.context_size,
        store_batch_size=cfg.store_batch_size,
        column=column,
        is_tokenized=is_tokenized,
        prepend_bos=cfg.prepend_bos,
        exclude_special_tokens=cfg.exclude_special_tokens,
        n_eval_sequences=0 if manifest is not None else cfg.n_eval_sequences,
        dtype=cfg.dtype,
        device=cfg.device,
    )
    if manifest is None:
        manifest = _start_cache(folder, cfg, store)
    else:
        # Continue the token stream where the last complete shard ended.
        state = store.state_dict()
        state.update(manifest["position"])
        store.load_state_dict(state)
        manifest["complete"] = False

    progress = tqdm(
        total=cfg.total_training_tokens,
        initial=min(manifest["n_tokens"], cfg.total_training_tokens),
        desc=f"caching {folder.name}",
        unit="tok",
        unit_scale=True,
        disable=not show_progress,
    )
    try:
        while manifest["n_tokens"] < cfg.total_training_tokens and not manifest["dataset_exhausted"]:
            tensors, n_rows, exhausted = _next_shard(store, cfg, manifest, progress)
            manifest["dataset_exhausted"] = exhausted
            if n_rows == 0:
                break
            index = len(manifest["shards"])
            if tensors is not None:
                manifest["shards"].append(write_safetensors_checked(folder, shard_filename(index), tensors))
                manifest["n_tokens"] += manifest["shards"][-1]["n_tokens"]
            manifest["n_rows"] += n_rows
            manifest["position"] = {"rows_consumed": store.rows_consumed, "pending": list(store.pending)}
            manifest["config"]["total_training_tokens"] = cfg.total_training_tokens
            write_manifest(folder, manifest)
            if on_shard is not None and tensors is not None:
                on_shard(index, manifest)
    finally:
        progress.close()
    manifest["complete"] = True
    manifest["config"]["total_training_tokens"] = cfg.total_training_tokens
    write_manifest(folder, manifest)
    return manifest


def _finished(manifest: dict[str, Any], cfg: CacheActivationsRunnerConfig) -> bool:
    return manifest["complete"] and (
        manifest["dataset_exhausted"] or manifest["n_tokens"] >= cfg.total_training_tokens
    )


def _resumable_manifest(folder: Path, cfg: CacheActivationsRunnerConfig) -> dict[str, Any] | None:
    """The manifest of an earlier run of the same cache in `folder`, or None for an empty folder."""
    if not (folder / MANIFEST_FILENAME).exists():
        # A run killed before its first manifest may have left the held-out file or temporaries.
        others = [p.name for p in folder.iterdir() if not (_is_temporary(p) or _is_cache_file(p))]
        if others:
            raise SAELensError(
                f"cached_activations_path {str(folder)!r} is not empty and holds no {MANIFEST_FILENAME} "
                f"(found {others[0]!r}); choose a new or empty folder"
            )
        return None
    manifest = read_manifest(folder)
    earlier = manifest.get("config", {})
    for name in CONTENT_FIELDS:
        value = getattr(cfg, name)
        if name == "model_name":
            value = model_key(value)
            earlier_value = model_key(str(earlier.get(name)))
        else:
            earlier_value = earlier.get(name)
        if earlier_value != value:
            raise SAELensError(
                f"cached_activations_path {str(folder)!r} holds a cache written with {name}={earlier_value!r} "
                f"(this config: {value!r}); use the same settings to resume it, or another folder"
            )
    return manifest


def _is_temporary(path: Path) -> bool:
    # atomic_write_bytes writes `.<name>.<random>.tmp` beside the target.
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _is_cache_file(path: Path) -> bool:
    return path.name == EVAL_FILENAME or (path.name.startswith("shard_") and path.suffix == ".safetensors")


def _remove_unlisted_files(folder: Path, manifest: dict[str, Any] | None) -> None:
    """Delete what an interrupted run left that the manifest does not list: half-written temporary
    files, and a shard (or held-out file) written after the last manifest update; they are written
    again."""
    listed = set()
    if manifest is not None:
        listed = {entry["file"] for entry in manifest["shards"]}
        listed |= {manifest["eval"]["file"]} if manifest.get("eval") else set()
    for path in folder.iterdir():
        if path.is_file() and (_is_temporary(path) or (_is_cache_file(path) and path.name not in listed)):
            path.unlink(missing_ok=True)


def _start_cache(folder: Path, cfg: CacheActivationsRunnerConfig, store: ActivationsStore) -> dict[str, Any]:
    """Write the held-out rows and the first manifest (before any shard, so a folder with shards
    always has a manifest)."""
    # The widths, from one token through the model (the held-out rows may be disabled).
    probe = store.get_activations_by_hook(torch.full((1, 1), store.start_token_id, dtype=torch.long))
    widths = {hook: int(acts.shape[-1]) for hook, acts in probe.items()}
    manifest = new_manifest(
        model_name=cfg.model_name,
        hook_widths=widths,
        dtype=cfg.dtype,
        context_size=cfg.context_size,
        config=cfg.to_dict(),
        eval_tokens=store.eval_tokens,
    )
    if store.eval_tokens is not None:
        tokens = store.eval_tokens
        chunks = [
            store.kept_activations_by_hook(tokens[i : i + cfg.store_batch_size])
            for i in range(0, tokens.shape[0], cfg.store_batch_size)
        ]
        held_out = {hook: torch.cat([chunk[hook] for chunk in chunks]) for hook in cfg.hook_points}
        entry = write_safetensors_checked(folder, EVAL_FILENAME, {**held_out, "tokens": tokens})
        entry["n_rows"] = int(tokens.shape[0])
        manifest["eval"] = entry
    write_manifest(folder, manifest)
    return manifest


def _next_shard(
    store: ActivationsStore, cfg: CacheActivationsRunnerConfig, manifest: dict[str, Any], progress: Any
) -> tuple[dict[str, torch.Tensor] | None, int, bool]:
    """The next shard's tensors (None if every token was excluded), its row count, and whether the
    dataset ended.

    The rows are fetched in batches that start at the shard's first row, so a resumed run groups
    them exactly as an uninterrupted one does (and computes bit-identical activations).
    """
    parts: list[dict[str, torch.Tensor]] = []
    n_rows = n_tokens = 0
    exhausted = False
    first_row = manifest["n_rows"]
    while n_rows < cfg.rows_per_shard:
        missing = cfg.total_training_tokens - manifest["n_tokens"] - n_tokens
        if missing <= 0:
            break
        # A row keeps at most context_size tokens, so this never reads a row more than needed.
        want = min(cfg.store_batch_size, cfg.rows_per_shard - n_rows, math.ceil(missing / cfg.context_size))
        try:
            tokens = store.get_batch_tokens(want)
        except DatasetExhausted:
            exhausted = True
            break
        acts = store.kept_activations_by_hook(tokens)
        keep = ~torch.isin(tokens, store.excluded_token_ids)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        rows = torch.arange(first_row + n_rows, first_row + n_rows + tokens.shape[0]).unsqueeze(1)
        parts.append(
            {
                **{hook: value.cpu() for hook, value in acts.items()},
                "token_ids": tokens[keep],
                "positions": positions[keep],
                "row_ids": rows.expand_as(tokens)[keep],
            }
        )
        n_rows += tokens.shape[0]
        n_tokens += int(keep.sum())
        progress.update(int(keep.sum()))
        if tokens.shape[0] < want:
            exhausted = True
            break
    if n_tokens == 0:
        return None, n_rows, exhausted
    tensors = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    return tensors, n_rows, exhausted


# -- reading ------------------------------------------------------------------------------------------


class _SafetensorsShards:
    """The shards of a cache folder, read one slice at a time with `safe_open` (never a whole cache)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], verify_checksums: bool) -> None:
        self.folder = folder
        self.manifest = manifest
        self.sizes = [int(entry["n_tokens"]) for entry in manifest["shards"]]
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()
        # Sizes are checked up front (cheap: catches truncated and missing shards before training);
        # each checksum when its shard is first read.
        for entry in manifest["shards"]:
            _check_file(folder, entry, verify_checksum=False)
        digest = hashlib.sha256("".join(entry["sha256"] for entry in manifest["shards"]).encode())
        self.fingerprint = digest.hexdigest()

    def read(self, shard: int, start: int, stop: int, hooks: Sequence[str]) -> list[torch.Tensor]:
        """Rows `start:stop` of `shard`, one `[stop - start, d_hook]` tensor per hook (views of the
        memory-mapped file: the rows are copied once, into the buffer)."""
        entry = self.manifest["shards"][shard]
        path = _check_file(self.folder, entry, self.verify_checksums and shard not in self._verified)
        self._verified.add(shard)
        try:
            with safe_open(str(path), framework="pt") as file:
                return [file.get_slice(hook)[start:stop] for hook in hooks]
        except SafetensorError as error:
            raise SAELensError(
                f"{path} cannot be read ({error}); delete the cache and write it again"
            ) from None

    def held_out(self, hooks: Sequence[str]) -> dict[str, torch.Tensor] | None:
        entry = self.manifest.get("eval")
        if not entry:
            return None
        path = _check_file(self.folder, entry, self.verify_checksums)
        with safe_open(str(path), framework="pt") as file:
            return {hook: file.get_tensor(hook) for hook in hooks}


class _ArrowShards:
    """An HF dataset of activations (one row per token, a list-of-floats column per hook), read in
    blocks of consecutive rows that play the part of shards. Its first `n_held_out` rows are held out."""

    def __init__(self, folder: Path, split: str, n_held_out: int) -> None:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError) as error:
            raise SAELensError(f"{str(folder)!r} is not a readable saved dataset ({error})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SAELensError(
                    f"saved dataset {str(folder)!r} has no split {split!r} (it has {list(loaded)})"
                )
            loaded = loaded[split]
        float_columns = {
            name: feature
            for name, feature in loaded.features.items()
            if name not in META_KEYS and _float_list_dtype(feature) is not None
        }
        if not float_columns:
            raise SAELensError(
                f"saved dataset {str(folder)!r} has no activation column (lists of floats, named by hook); "
                f"its columns are {loaded.column_names}"
            )
        first_row = loaded[0] if len(loaded) else {}
        widths = {name: len(first_row[name]) for name in float_columns}
        dtypes = {str(_float_list_dtype(feature)) for feature in float_columns.values()}
        if len(dtypes) != 1:
            raise SAELensError(f"saved dataset {str(folder)!r} mixes activation dtypes {sorted(dtypes)}")
        if len(loaded) <= n_held_out:
            raise SAELensError(
                f"saved dataset {str(folder)!r} has {len(loaded)} rows, no more than the {n_held_out} held "
                "out for evaluation; lower n_held_out_tokens"
            )
        self.dataset = loaded.with_format("numpy")
        self.n_held_out = n_held_out
        self.manifest = new_manifest(
            model_name=None, hook_widths=widths, dtype=dtypes.pop(), context_size=None
        )
        n_train = len(loaded) - n_held_out
        self.sizes = [
            min(ARROW_ROWS_PER_SHARD, n_train - start) for start in range(0, n_train, ARROW_ROWS_PER_SHARD)
        ]
        self.manifest["n_tokens"] = n_train
        self.fingerprint = f"{getattr(loaded, '_fingerprint', '')}:{len(loaded)}:{n_held_out}"
        self.folder = folder

    def _rows(self, start: int, stop: int, hooks: Sequence[str]) -> list[torch.Tensor]:
        block = self.dataset[start:stop]
        parts = []
        for hook in hooks:
            values = block[hook]
            if values.dtype == object:  # ragged lists: not one width
                raise SAELensError(
                    f"column {hook!r} of {str(self.folder)!r} holds lists of different lengths"
                )
            parts.append(torch.from_numpy(values.reshape(stop - start, -1)))
        return parts

    def read(self, shard: int, start: int, stop: int, hooks: Sequence[str]) -> list[torch.Tensor]:
        base = self.n_held_out + shard * ARROW_ROWS_PER_SHARD
        return self._rows(base + start, base + stop, hooks)

    def held_out(self, hooks: Sequence[str]) -> dict[str, torch.Tensor] | None:
        if self.n_held_out == 0:
            return None
        return dict(zip(hooks, self._rows(0, self.n_held_out, hooks), strict=True))


def _float_list_dtype(feature: Any) -> str | None:
    """`float32` for a column of float32 lists (`List`, `Sequence`), else None."""
    inner = getattr(feature, "feature", None)
    dtype = getattr(inner, "dtype", None)
    return dtype if dtype in ("float16", "float32", "float64") else None


def is_saved_hf_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `datasets`' `save_to_disk` (a Dataset or DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


class CachedActivationsStore(ShuffleBufferServing):
    """Training batches read from an activation cache, with the interface of `ActivationsStore`.

    Shards are read in a seeded random order (a new one each epoch), `n_open_shards` at a time:
    each refill of the buffer takes an equal slice from every open shard, then the buffer is
    shuffled and half of it served, as in `ActivationsStore`, so consecutive batches mix rows of
    many shards. The buffer holds `n_batches_in_buffer * train_batch_size` rows, whatever the
    cache's size.

    A refill scatters the unserved rows and the new slices straight to their shuffled places in a
    new buffer, so each row is copied once per refill (a concatenation and then a gather, as in
    `ActivationsStore`, would be three copies); batches are views of the buffer they came from.

    With `world_size` > 1 (torchrun), rank `r` reads shards `r, r + world_size, ...` only, so ranks
    sharing one cache on shared storage train on disjoint data.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        train_batch_size: int,
        hook_points: Sequence[str] | None = None,
        n_batches_in_buffer: int = 32,
        n_open_shards: int = 8,
        n_epochs: int | None = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        model_name: str | None = None,
        d_in: int | None = None,
        dtype: str | None = None,
        verify_checksums: bool = True,
        split: str = "train",
        n_held_out_tokens: int = 4096,
    ) -> None:
        """Open the cache at `path` (a folder written by `cache_activations_runner`, or a saved HF
        dataset of activations, whose first `n_held_out_tokens` rows are held out).

        `model_name`, `hook_points`, `d_in` and `dtype`, when given, must match the cache
        (`check_cache_matches`). `n_epochs=None` cycles through the cache without end.
        """
        for name, value in (
            ("train_batch_size", train_batch_size),
            ("n_open_shards", n_open_shards),
            ("world_size", world_size),
        ):
            positive_int(name, value)
        optional(positive_int)("n_epochs", n_epochs)
        if not 0 <= rank < world_size:
            raise SAELensError(f"rank must be in [0, {world_size}), got {rank}")
        folder = Path(path).expanduser()
        self.path = folder
        if folder.is_dir() and not (folder / MANIFEST_FILENAME).exists() and is_saved_hf_dataset(folder):
            self._source: _SafetensorsShards | _ArrowShards = _ArrowShards(folder, split, n_held_out_tokens)
        else:
            self._source = _SafetensorsShards(folder, read_manifest(folder), verify_checksums)
        self.manifest = self._source.manifest
        hooks = list(hook_points) if hook_points else list(self.manifest["hook_points"])
        check_cache_matches(
            self.manifest, model_name=model_name, hooks=hooks, d_in=d_in, dtype=dtype, path=path
        )
        self.hook_points = hooks
        self.hook_point = hooks[0]
        self.hook_widths = {hook: int(self.manifest["hook_widths"][hook]) for hook in hooks}
        self.dtype = torch_dtype(self.manifest["dtype"])
        self.device = torch.device(device)
        self.train_batch_size = train_batch_size
        self.n_batches_in_buffer = max(2, n_batches_in_buffer)
        self.n_open_shards = n_open_shards
        self.n_epochs = n_epochs
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        # Every rank refuses (not only those left without a shard), so no rank waits on the others.
        if len(self._source.sizes) < world_size:
            raise SAELensError(
                f"activation cache {str(path)!r} has {len(self._source.sizes)} shards, fewer than the "
                f"{world_size} ranks; write it with a smaller shard_size_tokens"
            )
        self.shards = list(range(len(self._source.sizes)))[rank::world_size]
        """Indices of the shards this rank reads."""
        self.n_tokens = sum(self._source.sizes[shard] for shard in self.shards)
        """Rows this rank reads per epoch."""
        eval_rows = self.manifest.get("eval_tokens")
        self.eval_tokens = torch.tensor(eval_rows, dtype=torch.long) if eval_rows else None
        """The held-out token rows `[n_eval_sequences, context_size]` (None for an HF dataset)."""
        self.generator = torch.Generator().manual_seed(seed)

        # Where the reading is: the epoch, its shard order, the next shard of it to open, and the
        # open shards with the row each has reached; then the buffer as in ActivationsStore.
        self._epoch = 0
        self._order = self._epoch_order(0)
        self._next_shard = 0
        self._open: list[list[int]] = []
        self._buffer: torch.Tensor | None = None
        """The shuffled rows `[n, Σ d_hook]`, every hook side by side."""
        self._position = 0
        self._n_serve = 0
        self._exhausted = False
        self._finished = False
        self.tokens_served = 0

    @classmethod
    def from_config(
        cls,
        cfg: LanguageModelSAERunnerConfig,
        hook_points: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **options: Any,
    ) -> CachedActivationsStore:
        """The store a training run with `use_cached_activations=True` reads: `cfg.cached_activations_path`
        checked against `cfg.model_name`, the hooks, `cfg.d_in` and `cfg.dtype`, split across the
        torchrun ranks. `options` go to the constructor (`n_epochs`, `n_open_shards`, ...)."""
        if not cfg.cached_activations_path:
            raise SAELensError(
                "use_cached_activations needs cached_activations_path (a folder written by sae-lens cache)"
            )
        given = list(hook_points) if hook_points else [cfg.hook_point, cfg.hook_point_out]
        hooks = [hook for hook in dict.fromkeys(given) if hook]
        return cls(
            cfg.cached_activations_path,
            train_batch_size=cfg.train_batch_size,
            hook_points=hooks,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            seed=cfg.seed,
            device=distributed.local_device(cfg.device),
            rank=distributed.rank() if rank is None else rank,
            world_size=distributed.world_size() if world_size is None else world_size,
            model_name=cfg.model_name,
            d_in=cfg.d_in,
            dtype=cfg.dtype,
            split=cfg.dataset_split,
            **options,
        )

    # -- the shards -----------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        """This rank's shards in epoch `epoch`'s order (seeded, so a resumed run reads the same)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=generator).tolist()]

    def _open_more(self) -> None:
        """Open shards of the current epoch until `n_open_shards` are open; the next epoch starts once
        every shard of this one is read, so each pass serves every row once."""
        while len(self._open) < self.n_open_shards:
            if self._next_shard == len(self._order):
                if self._open or (self.n_epochs is not None and self._epoch + 1 >= self.n_epochs):
                    return
                self._epoch += 1
                self._order = self._epoch_order(self._epoch)
                self._next_shard = 0
            self._open.append([self._order[self._next_shard], 0])
            self._next_shard += 1

    def _take(self, n_rows: int) -> list[list[torch.Tensor]]:
        """Up to `n_rows` new rows as slices (one tensor per hook each), an equal share from each
        open shard; empty when the cache (all epochs) is used up."""
        slices: list[list[torch.Tensor]] = []
        remaining = n_rows
        while remaining > 0:
            self._open_more()
            if not self._open:
                break
            share = math.ceil(remaining / len(self._open))
            for entry in list(self._open):
                shard, start = entry
                stop = min(start + share, start + remaining, self._source.sizes[shard])
                if stop > start:
                    slices.append(self._source.read(shard, start, stop, self.hook_points))
                    remaining -= stop - start
                entry[1] = stop
                if stop == self._source.sizes[shard]:
                    self._open.remove(entry)
                if remaining == 0:
                    break
        return slices

    # -- the shuffling buffer (served by ShuffleBufferServing, as in ActivationsStore) ----------

    exhausted_message = "the activation cache has no more tokens"

    def _advance(self) -> bool:
        """Replace the served part of the buffer with new rows and shuffle; False when nothing is left."""
        if self._buffer is not None and self._exhausted:
            return False
        width = sum(self.hook_widths.values())
        empty = torch.empty(0, width, dtype=self.dtype)
        kept = self._buffer[self._n_serve :] if self._buffer is not None else empty
        wanted = self.buffer_size - kept.shape[0]
        slices = self._take(wanted) if wanted > 0 else []
        n_fresh = sum(parts[0].shape[0] for parts in slices)
        self._exhausted = n_fresh < wanted
        total = kept.shape[0] + n_fresh
        if total < self.train_batch_size:
            return False
        destination = torch.randperm(total, generator=self.generator)
        buffer = torch.empty(total, width, dtype=self.dtype)
        if kept.shape[0]:
            buffer.index_copy_(0, destination[: kept.shape[0]], kept)
        row = kept.shape[0]
        columns = [0, *itertools.accumulate(self.hook_widths.values())]
        for parts in slices:
            rows = destination[row : row + parts[0].shape[0]]
            for part, begin, end in zip(parts, columns[:-1], columns[1:], strict=True):
                target = buffer if len(parts) == 1 else buffer[:, begin:end]
                target.index_copy_(0, rows, part.to(self.dtype))
            row += parts[0].shape[0]
        self._buffer = buffer
        n_serve = total if self._exhausted else total // 2
        self._n_serve = n_serve - n_serve % self.train_batch_size
        self._position = 0
        return True

    # -- held-out rows ----------------------------------------------------------------------------

    def held_out_activations_by_hook(self) -> dict[str, torch.Tensor] | None:
        """`{hook: [n_eval_tokens, d_hook]}` (float32) of the held-out rows, as the runner's
        `held_out_activations_by_hook(store, store.eval_tokens)` computes them from the model; None
        when the cache has no held-out rows."""
        held_out = self._source.held_out(self.hook_points)
        if held_out is None:
            return None
        return {hook: value.float().to(self.device) for hook, value in held_out.items()}

    def held_out_activations(self) -> torch.Tensor | None:
        """The held-out activations `[n_eval_tokens, d_in]` of the first hook."""
        held_out = self.held_out_activations_by_hook()
        return None if held_out is None else held_out[self.hook_point]

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the reading is: epoch, shard order, open shards, the buffer and its position, the RNG."""
        return {
            "kind": "cached_activations",
            "cache": self._source.fingerprint,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "order": list(self._order),
            "next_shard": self._next_shard,
            "open": [list(entry) for entry in self._open],
            "generator": self.generator.get_state(),
            **self._buffer_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly from what `state_dict` returned (for a store over the same cache and hooks)."""
        if state.get("kind") != "cached_activations":
            raise SAELensError(
                "the checkpoint's store read activations from the model, not from a cache; resume it "
                "with use_cached_activations=False"
            )
        if state["hook_points"] != self.hook_points:
            raise SAELensError(
                f"the saved store read hooks {state['hook_points']}, this one reads {self.hook_points}"
            )
        if state["cache"] != self._source.fingerprint:
            raise SAELensError(
                f"the checkpoint's store read a different activation cache than {str(self.path)!r}; resume "
                "with the cache it was trained on"
            )
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise SAELensError(
                f"the checkpoint's store was rank {state['rank']} of {state['world_size']}, this one is "
                f"rank {self.rank} of {self.world_size}; resume with the same number of ranks"
            )
        self._epoch = int(state["epoch"])
        self._order = [int(shard) for shard in state["order"]]
        self._next_shard = int(state["next_shard"])
        self._open = [[int(shard), int(start)] for shard, start in state["open"]]
        self.generator.set_state(state["generator"])
        buffer = state["buffer"]
        self._load_buffer_state(state, buffer.to(self.dtype) if buffer is not None else None)


__all__ = [
    "CacheActivationsRunnerConfig",
    "CachedActivationsStore",
    "cache_activations_runner",
    "check_cache_matches",
    "read_manifest",
    "verify_cache",
]
