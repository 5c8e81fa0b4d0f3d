"""The pretrained-SAE registry and Hugging Face downloads.

`pretrained_saes.yaml` maps a release name to a Hugging Face repo, the model, the converter that
reads its files, the architecture, and its SAEs (id, path in the repo, hook, width, L0, ...).
`read_pretrained(release, sae_id)` resolves what a user names, in this order:

1. a registry release: the SAE's files are downloaded by `huggingface_hub.hf_hub_download` into the
   standard Hugging Face cache (so `HF_HUB_OFFLINE=1` works once they are cached), read by the
   release's converter, and given the registry's facts (model, hooks, architecture, overrides);
2. a local folder in any known format (`sae_id` = a sub-folder or member);
3. a Hugging Face repo id (`owner/name`) holding SAEs in any known format (`sae_id` = the folder
   in the repo): the formats' file layouts are tried in turn.

Anything else is an error naming the closest release names. Download problems (not cached while
offline, the Hub unreachable, a missing repo or file) are one line each; `huggingface_hub` writes a
file into the cache only once it is complete, so a failed download leaves nothing half-written.

This module builds data (`SAEFiles`); it imports no SAE class.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from sae_lens.errors import SAELensError
from sae_lens.sae_files import (
    SOURCE_METADATA_KEYS,
    HubLayout,
    SAEFiles,
    get_format,
    read_sae_folder,
    registered_formats,
    safe_relative_path,
    scale_rows_and_columns,
)

REGISTRY_PATH = Path(__file__).with_name("pretrained_saes.yaml")
REPO_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")

# config_overrides keys that belong in `metadata` (the rest are architecture options such as `k`).
METADATA_OVERRIDES = {*SOURCE_METADATA_KEYS, "model_from_pretrained_kwargs", "neuronpedia_id"}
# Architectures a release may record whose saved files run as another (BatchTopK-family SAEs are
# saved, and run, as JumpReLU with their learned threshold).
INFERENCE_FORMS = {"batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}


# -- the registry -------------------------------------------------------------------------------------


@functools.cache
def load_registry() -> dict[str, dict[str, Any]]:
    """The parsed registry (cached: the file is ~1 MB, parsed once per process)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(REGISTRY_PATH.read_text(), Loader=loader)  # a safe loader: plain data only
    if not isinstance(data, dict):
        raise SAELensError(f"{str(REGISTRY_PATH)!r} is not a mapping of releases")
    return data


@dataclass(frozen=True)
class PretrainedSAE:
    """One SAE of the registry."""

    release: str
    sae_id: str
    repo_id: str
    path: str
    """Where the SAE's files are in the repo (a folder, or a file for hook-z releases)."""
    model: str
    """Hugging Face id of the model it was trained on."""
    conversion_func: str
    """The format (converter) that reads its files."""
    architecture: str
    hook_name: str
    d_sae: int
    hook_name_out: str | None = None
    kind: str | None = None
    l0: float | None = None
    variance_explained: float | None = None
    neuronpedia: str | None = None
    norm_scaling_factor: float | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


def pretrained_releases() -> list[str]:
    """The registry's release names, in file order."""
    return list(load_registry())


def _entry(release: str, body: dict[str, Any], sae: dict[str, Any]) -> PretrainedSAE:
    return PretrainedSAE(
        release=release,
        sae_id=str(sae["id"]),
        repo_id=body["repo_id"],
        path=str(sae["path"]),
        model=body["model"],
        conversion_func=body["conversion_func"],
        architecture=body["architecture"],
        hook_name=sae["hook_name"],
        d_sae=int(sae["d_sae"]),
        hook_name_out=sae.get("hook_name_out"),
        kind=body.get("kind"),
        l0=sae.get("l0"),
        variance_explained=sae.get("variance_explained"),
        neuronpedia=sae.get("neuronpedia"),
        norm_scaling_factor=sae.get("norm_scaling_factor"),
        config_overrides=dict(body.get("config_overrides") or {}),
        links=dict(body.get("links") or {}),
    )


def release_saes(release: str) -> list[PretrainedSAE]:
    """Every SAE of a registry release; an unknown release names the closest ones."""
    registry = load_registry()
    if release not in registry:
        raise SAELensError(f"unknown SAE release {release!r}{_suggest(release, list(registry))}")
    body = registry[release]
    return [_entry(release, body, sae) for sae in body["saes"]]


def get_pretrained_sae(release: str, sae_id: str | None) -> PretrainedSAE:
    """The registry entry of `sae_id` in `release` (its only SAE when `sae_id` is None)."""
    saes = release_saes(release)
    if sae_id is None:
        if len(saes) == 1:
            return saes[0]
        raise SAELensError(
            f"release {release!r} holds {len(saes)} SAEs; pass an sae_id, e.g. {saes[0].sae_id!r} "
            f"(`sae-lens list {release}` lists them)"
        )
    for sae in saes:
        if sae.sae_id == sae_id:
            return sae
    # A path in the repo names its SAE too (the gemma-scope canonical ids point at such paths).
    by_path = [sae for sae in saes if sae.path == sae_id]
    if len(by_path) == 1:
        return by_path[0]
    raise SAELensError(
        f"release {release!r} has no SAE {sae_id!r}{_suggest(sae_id, [sae.sae_id for sae in saes])}; "
        f"`sae-lens list {release}` lists its {len(saes)} ids"
    )


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        # Ids differ mostly in one number (layer_12/width_16k/...): compare case-insensitively by pieces.
        close = difflib.get_close_matches(name.lower(), [c.lower() for c in candidates], n=3, cutoff=0.4)
        lookup = {c.lower(): c for c in candidates}
        close = [lookup[c] for c in close]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def list_pretrained_saes(pattern: str | None = None) -> list[PretrainedSAE]:
    """Registry SAEs whose release or id matches `pattern` (a glob like `gemma-scope-2b-*`, or a
    case-insensitive substring), all of them when None."""
    found = []
    for release, body in load_registry().items():
        for sae in body["saes"]:
            if pattern is None or _matches(pattern, release, str(sae["id"])):
                found.append(_entry(release, body, sae))
    return found


def _matches(pattern: str, release: str, sae_id: str) -> bool:
    if any(char in pattern for char in "*?["):
        return any(fnmatch.fnmatchcase(text, pattern) for text in (release, sae_id, f"{release}/{sae_id}"))
    needle = pattern.lower()
    return needle in release.lower() or needle in sae_id.lower()


def _width(d_sae: int) -> str:
    for power, suffix in ((20, "m"), (10, "k")):
        if d_sae >= 1 << power and d_sae % (1 << power) == 0:
            return f"{d_sae >> power}{suffix}"
    return str(d_sae)


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(header)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines)


def pretrained_saes_table(pattern: str | None = None, *, summary: bool = False) -> str:
    """A text table of the registry: one row per SAE (release, id, model, hook, width, L0), or with
    `summary` one per release (model, architecture, SAE count, widths). `pattern` filters releases
    and ids (glob or substring, see `list_pretrained_saes`)."""
    saes = list_pretrained_saes(pattern)
    if not saes:
        return f"no pretrained SAE matches {pattern!r}"
    if summary:
        releases: dict[str, list[PretrainedSAE]] = {}
        for sae in saes:
            releases.setdefault(sae.release, []).append(sae)
        rows = [
            [
                name,
                items[0].model,
                items[0].architecture + (" transcoder" if items[0].kind == "transcoder" else ""),
                str(len(items)),
                ",".join(_width(w) for w in sorted({sae.d_sae for sae in items})),
                items[0].repo_id,
            ]
            for name, items in releases.items()
        ]
        return _format_table(["release", "model", "architecture", "saes", "widths", "repo"], rows)
    rows = []
    for sae in saes:
        hook = sae.hook_name + (f" -> {sae.hook_name_out}" if sae.hook_name_out else "")
        l0 = "" if sae.l0 is None else f"{sae.l0:g}"
        rows.append([sae.release, sae.sae_id, sae.model, hook, _width(sae.d_sae), l0])
    return _format_table(["release", "sae_id", "model", "hook", "width", "l0"], rows)


# -- Hugging Face downloads ---------------------------------------------------------------------------


def _network_errors() -> tuple[type[Exception], ...]:
    """Transport-level exceptions of whichever HTTP client this huggingface_hub uses."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # huggingface_hub < 1.0 uses requests
        pass
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:
        pass
    return tuple(errors)


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    # huggingface_hub logs each retry of a failed request as a warning; the failure is reported
    # once, in our own one-line error, instead.
    logger = logging.getLogger("huggingface_hub")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


NETWORK_ERRORS = _network_errors()


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face cache downloads go to (`HF_HUB_CACHE`, or `$HF_HOME/hub`)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download_file(
    repo_id: str, filename: str, *, force_download: bool = False, missing_ok: bool = False
) -> Path | None:
    """`filename` of Hugging Face repo `repo_id` in the local cache, downloaded when needed.

    With `missing_ok`, a file the repo does not have (or, offline, one not cached) gives None.
    Every other failure is one line naming the repo, the file and what to do.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    filename = safe_relative_path(filename, f"file path in repo {repo_id!r}")
    transport_errors: tuple[type[Exception], ...] = (HfHubHTTPError, *NETWORK_ERRORS)
    if force_download and hub_offline():
        raise SAELensError("force_download needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 is set; unset it")
    try:
        with _quiet_hub_logs():
            return Path(hf_hub_download(repo_id, filename, force_download=force_download))
    except LocalEntryNotFoundError as error:  # before EntryNotFoundError, its base class
        if hub_offline():
            if missing_ok:
                return None
            raise SAELensError(
                f"{filename!r} of Hugging Face repo {repo_id!r} is not in the cache ({hub_cache_dir()}) and "
                "HF_HUB_OFFLINE=1 is set; download it once with the Hub reachable, or unset HF_HUB_OFFLINE"
            ) from None
        reason = _reason(error.__cause__ or error)
        raise SAELensError(
            f"could not reach the Hugging Face Hub for {filename!r} of repo {repo_id!r} ({reason}) and the "
            "file is not cached; check the connection or proxy (HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use "
            "cached files only"
        ) from None
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise SAELensError(f"Hugging Face repo {repo_id!r} has no file {filename!r}") from None
    except GatedRepoError:
        raise SAELensError(
            f"Hugging Face repo {repo_id!r} is gated; accept its terms on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise SAELensError(
            f"Hugging Face repo {repo_id!r} does not exist (or is private: log in with `hf auth login`)"
            f"{_suggest(repo_id, pretrained_releases())}"
        ) from None
    except RevisionNotFoundError:
        raise SAELensError(f"Hugging Face repo {repo_id!r} has no main revision") from None
    except transport_errors as error:
        raise SAELensError(
            f"could not download {filename!r} of Hugging Face repo {repo_id!r} ({_reason(error)}); "
            "try again, or check the connection"
        ) from None


def download_optional_file(repo_id: str, filename: str, *, force_download: bool = False) -> Path | None:
    """Like `download_file`, but None for any failure: for files an SAE loads without (sparsity)."""
    try:
        return download_file(repo_id, filename, force_download=force_download, missing_ok=True)
    except SAELensError:
        return None


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _snapshot_root(local: Path, filename: str) -> Path:
    """The cached snapshot folder a downloaded `local` file (at repo path `filename`) lies in."""
    return local.parents[len(PurePosixPath(filename).parts) - 1]


def _layout_of(format_name: str, path: str) -> HubLayout | None:
    sae_format = get_format(format_name)
    return sae_format.hub_layout(path) if sae_format.hub_layout is not None else None


def _fetch(repo_id: str, layout: HubLayout, *, force_download: bool, probe: bool) -> Path | None:
    """The local folder holding `layout`'s files, downloading what is not cached. With `probe`,
    None as soon as a required file is missing from the repo (or, offline, from the cache)."""
    root = None
    for filename in layout.required:
        local = download_file(repo_id, filename, force_download=force_download, missing_ok=probe)
        if local is None:
            return None
        root = root or _snapshot_root(local, filename)
    for filename in layout.optional:
        download_optional_file(repo_id, filename, force_download=force_download)
    assert root is not None  # every layout requires at least one file
    return root / layout.folder if layout.folder else root


def download_layout(
    repo_id: str, format_name: str, path: str, *, force_download: bool = False
) -> tuple[Path, str | None]:
    """Download the files the format `format_name` needs for the SAE at `path` of `repo_id`;
    returns the local folder to read and the member within it (None for folder formats)."""
    layout = _layout_of(format_name, path)
    if layout is None:
        raise SAELensError(f"repo path {path!r} cannot hold a {format_name} SAE")
    folder = _fetch(repo_id, layout, force_download=force_download, probe=False)
    assert folder is not None  # without probe, a missing file raises
    return folder, layout.member


def find_repo_sae(
    repo_id: str, sae_id: str | None, *, force_download: bool = False
) -> tuple[Path, str | None, str]:
    """Download the SAE at `sae_id` (a repo folder, or a file for file-per-SAE formats) of a repo
    the registry does not list, trying each format's file layout in turn (most specific first).

    A format is taken when all its required files are there: a `config.json` alone (which many
    folders have) commits to nothing. Returns `(local folder, member, format name)`."""
    path = safe_relative_path(sae_id, "sae_id") if sae_id else ""
    tried = []
    for name in registered_formats():
        layout = _layout_of(name, path)
        if layout is None:
            continue
        tried.append(name)
        folder = _fetch(repo_id, layout, force_download=force_download, probe=True)
        if folder is not None:
            return folder, layout.member, name
    where = f"folder {path!r} of" if path else "the root of"
    if hub_offline():
        raise SAELensError(
            f"no cached SAE in {where} Hugging Face repo {repo_id!r} (looked for the files of: {', '.join(tried)}) "
            "and HF_HUB_OFFLINE=1 is set; download it once with the Hub reachable"
        )
    hint = "" if path else "; pass an sae_id (the folder of the SAE in the repo)"
    raise SAELensError(
        f"{where} Hugging Face repo {repo_id!r} holds no SAE in a known format ({', '.join(tried)}){hint}"
    )


# -- resolving what a user names ---------------------------------------------------------------------


def apply_registry(files: SAEFiles, entry: PretrainedSAE) -> SAEFiles:
    """The files' config with the registry's facts: model, hooks, architecture, overrides, and
    the input normalisation folded (the SAE then takes raw activations)."""
    config = dict(files.config)
    metadata = dict(config.get("metadata") or {})
    metadata.update(
        model_name=entry.model,
        hook_name=entry.hook_name,
        release=entry.release,
        sae_id=entry.sae_id,
    )
    layer = re.match(r"blocks\.(\d+)\.", entry.hook_name)
    metadata["hook_layer"] = int(layer.group(1)) if layer else metadata.get("hook_layer", 0)
    if entry.hook_name_out:
        metadata["hook_name_out"] = entry.hook_name_out
    if entry.neuronpedia:
        metadata["neuronpedia_id"] = entry.neuronpedia
    for key, value in entry.config_overrides.items():
        if key in METADATA_OVERRIDES:
            metadata[key] = value
        else:
            config[key] = value
    config["metadata"] = metadata
    # The registry records the architecture because some files name the wrong one (the OpenAI v5
    # TopK SAEs were once saved as ReLU ones); it wins, except over the JumpReLU form BatchTopK
    # SAEs are saved and run in.
    if INFERENCE_FORMS.get(entry.architecture) != config.get("architecture"):
        config["architecture"] = entry.architecture
    _check_norm_scale(entry, files)
    state = files.state_dict
    if config.get("normalize_activations") == "expected_average_only_in" and entry.norm_scaling_factor:
        # Trained on s * x: (s x - b_dec) @ W_enc = (x - b_dec / s) @ (s W_enc), and the output is
        # divided by s again; folded so the SAE takes raw activations.
        scale = float(entry.norm_scaling_factor)
        scale_rows_and_columns(state["W_enc"], factor=scale)
        scale_rows_and_columns(state["W_dec"], factor=1 / scale)
        scale_rows_and_columns(state["b_dec"], factor=1 / scale)
        config["normalize_activations"] = "none"
        metadata["folded_norm_scaling_factor"] = scale
    return SAEFiles(config, state, files.log_feature_sparsity)


def read_pretrained(
    release: str, sae_id: str | None = None, *, device: str | None = None, force_download: bool = False
) -> tuple[SAEFiles, str]:
    """`(files in our layout, a source label)` for a registry release, a local folder or a Hugging
    Face repo id (see the module docstring)."""
    registry = load_registry()
    if release in registry:
        entry = get_pretrained_sae(release, sae_id)
        path = safe_relative_path(entry.path, f"path of {release}/{entry.sae_id} in the registry")
        folder, member = download_layout(
            entry.repo_id, entry.conversion_func, path, force_download=force_download
        )
        files = read_sae_folder(folder, device, format_name=entry.conversion_func, sae_id=member)
        return apply_registry(files, entry), f"{release}/{entry.sae_id}"
    local = Path(release).expanduser()
    if local.is_dir():
        return read_sae_folder(local, device, sae_id=sae_id), str(local / sae_id if sae_id else local)
    if release.startswith((".", "/", "~")) or local.exists():
        raise SAELensError(f"SAE folder {release!r} does not exist (or is not a folder)")
    if REPO_ID_RE.fullmatch(release):
        try:
            folder, member, format_name = find_repo_sae(release, sae_id, force_download=force_download)
        except SAELensError as error:
            # `owner/name` may also have been meant as a local path.
            raise SAELensError(f"{error} (no local folder {release!r} exists either)") from None
        files = read_sae_folder(folder, device, format_name=format_name, sae_id=member)
        return files, f"{release}/{sae_id}" if sae_id else release
    raise SAELensError(
        f"unknown SAE release {release!r}{_suggest(release, list(registry))}; pass a registry release "
        "(`sae-lens list`), a Hugging Face repo id (owner/name) or an SAE folder"
    )


def _check_norm_scale(entry: PretrainedSAE, files: SAEFiles) -> None:
    """A converter's own input scale must agree with the registry's norm_scaling_factor (Llama
    Scope records it in both places); a mismatch means the repo and the registry disagree."""
    own = (files.config.get("metadata") or {}).get("dataset_norm_scaling_factor_in")
    if own is None or entry.norm_scaling_factor is None:
        return
    if not math.isclose(float(own), float(entry.norm_scaling_factor), rel_tol=1e-3):
        raise SAELensError(
            f"{entry.release}/{entry.sae_id}: the files' input scale {float(own):.6g} differs from the "
            f"registry's norm_scaling_factor {float(entry.norm_scaling_factor):.6g}"
        )


__all__ = [
    "REGISTRY_PATH",
    "PretrainedSAE",
    "apply_registry",
    "download_file",
    "download_layout",
    "download_optional_file",
    "find_repo_sae",
    "get_pretrained_sae",
    "list_pretrained_saes",
    "load_registry",
    "pretrained_releases",
    "pretrained_saes_table",
    "read_pretrained",
    "release_saes",
]
