"""Load text (or pretokenized) datasets from builtin corpora, local files or the HF hub.

``load_text_dataset`` resolves a ``dataset_path`` in this order:

1. ``builtin:<name>``: a corpus embedded in sae_lens (see ``BUILTIN_DATASETS``).
2. An existing local path: a ``save_to_disk`` folder, a data file (``.txt``,
   ``.jsonl``/``.json``, ``.parquet``, ``.csv``) or a folder of data files.
3. Anything else that does not look like a path: a Hugging Face hub dataset name.

``.txt`` files are read one paragraph per row (paragraphs are separated by blank
lines): a line per row would cut wrapped prose mid-sentence, and a file per row would
turn one large file into a single huge document.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import datasets
import pyarrow as pa

from sae_lens.builtin_corpus import python_docs_dataset
from sae_lens.errors import SAELensError

AnyDataset: TypeAlias = datasets.Dataset | datasets.IterableDataset
# detect_column also accepts plain rows (e.g. a list of dicts built in a test or notebook).
Rows: TypeAlias = AnyDataset | Iterable[Mapping[str, Any]]

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS: dict[str, Callable[[], datasets.Dataset]] = {
    "python-docs": python_docs_dataset,
}

# File extension -> `datasets` packaged builder that reads it.
DATA_FILE_BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

# Checked in this order; the flag says whether the column holds token ids.
TEXT_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("tokens", True),
    ("input_ids", True),
    ("text", False),
)

# Buffer for approximate shuffling of streamed data, which cannot be shuffled exactly.
_STREAM_SHUFFLE_BUFFER = 10_000
_SINGLE_SPLIT = "train"
_HUB_HINT = "pass a local path, a save_to_disk folder or builtin:python-docs"


def load_text_dataset(
    dataset_path: str,
    *,
    split: str = "train",
    streaming: bool = False,
    seed: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load the dataset named by ``dataset_path`` (see the module docstring for the forms).

    Args:
        dataset_path: ``builtin:<name>``, a local file or folder, or a hub dataset name.
        split: split to take from a hub dataset or a saved DatasetDict. Plain local files
            and builtin corpora have the single split ``"train"``.
        streaming: return an IterableDataset instead of a Dataset.
        seed: when given, shuffle the documents with this seed (exactly for in-memory
            data, through a buffer for data streamed from files or the hub).

    Raises:
        SAELensError: the path does not exist, names an unknown builtin, has an
            unsupported format or split, or the hub could not provide the dataset.
    """
    if dataset_path.startswith(BUILTIN_PREFIX):
        _require_single_split(dataset_path, split)
        return _finish(_load_builtin(dataset_path), streaming=streaming, seed=seed)

    path = Path(dataset_path).expanduser()
    if path.exists():
        return _load_local(path, dataset_path, split=split, streaming=streaming, seed=seed)
    if _looks_like_local_path(dataset_path):
        raise SAELensError(
            f"dataset_path '{dataset_path}' does not exist; check the path (or use builtin:python-docs)"
        )
    return _load_from_hub(dataset_path, split=split, streaming=streaming, seed=seed)


def detect_column(dataset: Rows) -> tuple[str, bool]:
    """Return ``(column, is_tokenized)`` for the column that holds the documents.

    ``tokens`` and ``input_ids`` columns must hold lists of integer token ids and take
    priority over a ``text`` column of strings. A ``tokens`` column of strings (word
    tokens, as in NER datasets) is not token ids and is passed over. Plain iterables of
    rows are judged from their first row, so pass a list rather than a one-shot iterator.
    """
    column_names = _column_names(dataset)
    for name, is_tokenized in TEXT_COLUMNS:
        if name in column_names and _holds_expected_values(dataset, name, is_tokenized):
            return name, is_tokenized
    accepted = "'tokens' or 'input_ids' (lists of token ids) or 'text' (strings)"
    raise SAELensError(
        f"dataset has no usable document column: found columns {column_names}, "
        f"expected {accepted}; rename the column that holds the documents"
    )


def iter_documents(dataset: Rows, column: str, is_tokenized: bool) -> Iterator[str | list[int]]:
    """Yield each document of ``column``: a ``str``, or a ``list[int]`` when tokenized.

    ``dataset`` is a Hugging Face dataset or any iterable of row mappings. Empty and
    whitespace-only documents are skipped since they contribute no tokens (and would put
    separators back to back when documents are packed).
    """
    for _, document in enumerate_documents(dataset, column, is_tokenized):
        yield document


def enumerate_documents(
    dataset: Rows, column: str, is_tokenized: bool, start: int = 0
) -> Iterator[tuple[int, str | list[int]]]:
    """`(row index, document)` for each non-empty document, from row `start` on (rows before it are
    skipped without being read where the dataset allows it, for resuming)."""
    select = getattr(dataset, "select_columns", None)
    rows: Iterable[Mapping[str, Any]] = select([column]) if select is not None else dataset
    if start:
        skip = getattr(rows, "skip", None)
        rows = skip(start) if skip is not None else itertools.islice(iter(rows), start, None)
    for index, row in enumerate(rows, start):
        value = row[column]
        if is_tokenized:
            token_ids = [int(token_id) for token_id in value]
            if token_ids:
                yield index, token_ids
        elif isinstance(value, str) and value.strip():
            yield index, value


def _load_builtin(dataset_path: str) -> datasets.Dataset:
    name = dataset_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_DATASETS:
        available = ", ".join(BUILTIN_PREFIX + known for known in sorted(BUILTIN_DATASETS))
        raise SAELensError(
            f"unknown builtin dataset '{dataset_path}'; available builtin datasets: {available}"
        )
    return BUILTIN_DATASETS[name]()


def _load_local(
    path: Path, dataset_path: str, *, split: str, streaming: bool, seed: int | None
) -> AnyDataset:
    if path.is_dir() and _is_saved_dataset(path):
        return _finish(_load_saved(path, split), streaming=streaming, seed=seed)

    _require_single_split(dataset_path, split)
    files = _data_files(path, dataset_path)
    if all(file.stat().st_size == 0 for file in files):
        raise SAELensError(
            f"dataset_path '{dataset_path}' is empty; point it at a file (or folder) with text in it"
        )
    builder = DATA_FILE_BUILDERS[files[0].suffix.lower()]
    # Paragraph rows for text files (see the module docstring); other builders take no
    # such option.
    options: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    data_files = [str(file) for file in files]
    if streaming:
        # Stream straight from the files rather than converting them to Arrow first,
        # which would cost a full pass (and disk) for large corpora.
        stream = datasets.load_dataset(
            builder,
            data_files=data_files,
            split=_SINGLE_SPLIT,
            streaming=True,
            **options,
        )
        return _finish(stream, streaming=True, seed=seed)
    try:
        loaded = datasets.load_dataset(builder, data_files=data_files, split=_SINGLE_SPLIT, **options)
    except datasets.exceptions.DatasetGenerationError as error:
        # An empty or malformed file: the reason is in the chained error, not in the wrapper's text.
        cause = error.__cause__ or error
        raise SAELensError(
            f"dataset_path '{dataset_path}' could not be read ({_short_reason(cause)}); "
            "check that the file holds text (or rows of the expected format)"
        ) from None
    return _finish(loaded, streaming=False, seed=seed)


def _is_saved_dataset(folder: Path) -> bool:
    # The files that Dataset.save_to_disk / DatasetDict.save_to_disk always write.
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(folder: Path, split: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SAELensError(
                f"split '{split}' is not in the saved dataset at '{folder}'; "
                f"available splits: {', '.join(loaded)}"
            )
        return loaded[split]
    return loaded


def _data_files(path: Path, dataset_path: str) -> list[Path]:
    """Return the data files at ``path`` (a file, or a folder searched recursively)."""
    supported = ", ".join(DATA_FILE_BUILDERS)
    if path.is_file():
        if path.suffix.lower() not in DATA_FILE_BUILDERS:
            raise SAELensError(
                f"dataset_path '{dataset_path}' has unsupported extension "
                f"'{path.suffix or '(none)'}'; use one of {supported} or a save_to_disk "
                f"folder"
            )
        return [path]

    files = sorted(
        file
        for file in path.rglob("*")
        if file.is_file()
        and file.suffix.lower() in DATA_FILE_BUILDERS
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if not files:
        raise SAELensError(
            f"folder '{dataset_path}' holds no data files ({supported}) and is not a "
            f"save_to_disk folder; point dataset_path at your data"
        )
    builders = {DATA_FILE_BUILDERS[file.suffix.lower()] for file in files}
    if len(builders) > 1:
        suffixes = sorted({file.suffix.lower() for file in files})
        raise SAELensError(
            f"folder '{dataset_path}' mixes data file types ({', '.join(suffixes)}); "
            f"keep one type per folder or point dataset_path at a single file"
        )
    return files


def _load_from_hub(dataset_path: str, *, split: str, streaming: bool, seed: int | None) -> AnyDataset:
    try:
        loaded = datasets.load_dataset(dataset_path, split=split, streaming=streaming)
    except Exception as exc:
        # The hub raises many exception types (connection, offline mode, missing repo,
        # unknown split); all of them mean the same thing to the user, with the reason.
        raise SAELensError(
            f"dataset_path '{dataset_path}' is not a local file or folder and could not "
            f"be loaded from the Hugging Face hub ({_short_reason(exc)}); {_HUB_HINT}"
        ) from exc
    if not isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        raise SAELensError(
            f"dataset_path '{dataset_path}' did not give a single split for split='{split}'; "
            f"pass the name of one split"
        )
    return _finish(loaded, streaming=streaming, seed=seed)


def _finish(dataset: AnyDataset, *, streaming: bool, seed: int | None) -> AnyDataset:
    """Apply the optional shuffle and convert to an IterableDataset when streaming."""
    if isinstance(dataset, datasets.Dataset):
        if seed is not None:
            dataset = dataset.shuffle(seed=seed)
        return dataset.to_iterable_dataset() if streaming else dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed, buffer_size=_STREAM_SHUFFLE_BUFFER)
    return dataset


def _require_single_split(dataset_path: str, split: str) -> None:
    if split != _SINGLE_SPLIT:
        raise SAELensError(
            f"dataset_path '{dataset_path}' has only the split '{_SINGLE_SPLIT}', not "
            f"'{split}'; use split='{_SINGLE_SPLIT}' or save your splits with "
            f"DatasetDict.save_to_disk"
        )


def _looks_like_local_path(dataset_path: str) -> bool:
    # Hub names are "name" or "owner/name"; anything path-shaped that does not exist is
    # a mistyped local path, and sending it to the hub would only give a confusing error.
    if dataset_path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in dataset_path:
        return True
    if dataset_path.count("/") > 1:
        return True
    return Path(dataset_path).suffix.lower() in DATA_FILE_BUILDERS


def _short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first_line = lines[0] if lines else ""
    reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _column_names(dataset: Rows) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    # Streaming datasets may not know their features until a row is read.
    first = _first_row(dataset)
    return list(first) if first is not None else []


def _first_row(dataset: Rows) -> dict[str, Any] | None:
    for row in dataset:
        return dict(row)
    return None


def _holds_expected_values(dataset: Rows, column: str, is_tokenized: bool) -> bool:
    features = getattr(dataset, "features", None)
    if features is not None and column in features:
        arrow_type = features.arrow_schema.field(column).type
        if is_tokenized:
            return _is_integer_list_type(arrow_type)
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    # No schema (some streaming datasets): judge from the first row instead.
    first = _first_row(dataset)
    if first is None:
        return True
    value = first.get(column)
    if is_tokenized:
        return isinstance(value, list) and all(isinstance(item, int) for item in value)
    return isinstance(value, str)


def _is_integer_list_type(arrow_type: pa.DataType) -> bool:
    is_list = (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
    )
    return is_list and pa.types.is_integer(arrow_type.value_type)
