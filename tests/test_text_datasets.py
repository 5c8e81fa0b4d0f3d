"""sae_lens/text_datasets.py: loading local files, saved datasets and hub names (offline, real
files); the builtin:python-docs corpus itself is tested in tests/test_builtin_corpus.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from sae_lens.errors import SAELensError
from sae_lens.text_datasets import detect_column, iter_documents, load_text_dataset

DOCS = ["the first document", "a second, longer document", "third"]


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_dataset converts local files into Arrow under the HF cache; keep that out of
    # the home folder. datasets reads the variable at import, so patch its config too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _texts(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    return [row["text"] for row in dataset]


# --- save_to_disk folders ------------------------------------------------------------


def test_save_to_disk_folder(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    dataset = load_text_dataset(str(tmp_path / "saved"))
    assert isinstance(dataset, datasets.Dataset)
    assert _texts(dataset) == DOCS
    assert detect_column(dataset) == ("text", False)


def test_dataset_dict_folder_takes_split_and_lists_missing(tmp_path: Path) -> None:
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS}),
            "validation": datasets.Dataset.from_dict({"text": ["held out"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert _texts(load_text_dataset(str(tmp_path / "dict"))) == DOCS
    held_out = load_text_dataset(str(tmp_path / "dict"), split="validation")
    assert _texts(held_out) == ["held out"]
    with pytest.raises(SAELensError, match=r"split 'test'.*train, validation"):
        load_text_dataset(str(tmp_path / "dict"), split="test")


# --- data files ------------------------------------------------------------------------


def test_txt_file_gives_one_row_per_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nwrapped.\n\nSecond one.\n\n\nThird.\n")
    dataset = load_text_dataset(str(path))
    assert isinstance(dataset, datasets.Dataset)
    assert detect_column(dataset) == ("text", False)
    documents = [str(doc).strip() for doc in iter_documents(dataset, "text", False)]
    assert documents == ["First paragraph,\nwrapped.", "Second one.", "Third."]


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(DOCS)))
    dataset = load_text_dataset(str(path))
    assert _texts(dataset) == DOCS
    assert detect_column(dataset) == ("text", False)


def test_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(path))
    dataset = load_text_dataset(str(path))
    assert _texts(dataset) == DOCS


def test_folder_of_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for index, text in enumerate(DOCS):
        (folder / f"part-{index}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (folder / "README.md").write_text("not data")
    assert _texts(load_text_dataset(str(folder))) == DOCS


def test_folder_mixing_file_types_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "b.txt").write_text("y\n")
    with pytest.raises(SAELensError, match=r"mixes data file types"):
        load_text_dataset(str(tmp_path))


def test_unsupported_extension_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "docs.xml"
    path.write_text("<doc/>")
    with pytest.raises(SAELensError, match=r"unsupported extension '\.xml'"):
        load_text_dataset(str(path))


def test_other_split_of_plain_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(SAELensError, match=r"only the split 'train'"):
        load_text_dataset(str(path), split="validation")


# --- column detection ------------------------------------------------------------------


@pytest.mark.parametrize("column", ["tokens", "input_ids"])
def test_pretokenized_columns_are_detected(tmp_path: Path, column: str) -> None:
    rows = {column: [[5, 6, 7], [8]], "text": ["a b c", "d"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "tok"))
    dataset = load_text_dataset(str(tmp_path / "tok"))
    assert detect_column(dataset) == (column, True)
    assert list(iter_documents(dataset, column, True)) == [[5, 6, 7], [8]]


def test_word_tokens_column_is_not_token_ids() -> None:
    # NER-style datasets have a `tokens` column of words; the text column wins.
    dataset = datasets.Dataset.from_dict({"tokens": [["a", "b"]], "text": ["a b"]})
    assert detect_column(dataset) == ("text", False)


def test_missing_column_error_names_existing_columns() -> None:
    dataset = datasets.Dataset.from_dict({"content": ["x"], "label": [1]})
    with pytest.raises(SAELensError, match=r"\['content', 'label'\].*'text'"):
        detect_column(dataset)


def test_detect_column_without_features_peeks_first_row() -> None:
    stream = datasets.IterableDataset.from_generator(lambda: iter([{"input_ids": [1, 2]}]))
    assert stream.features is None
    assert detect_column(stream) == ("input_ids", True)


def test_iter_documents_skips_empty_documents() -> None:
    dataset = datasets.Dataset.from_dict({"text": ["keep", "", "  \n", "also"]})
    assert list(iter_documents(dataset, "text", False)) == ["keep", "also"]


# --- streaming and shuffling -----------------------------------------------------------


def test_streaming_local_data_gives_iterable_dataset(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    for path in (tmp_path / "saved", jsonl):
        stream = load_text_dataset(str(path), streaming=True)
        assert isinstance(stream, datasets.IterableDataset)
        assert detect_column(stream) == ("text", False)
        assert _texts(stream) == DOCS


def test_seed_shuffles_reproducibly(tmp_path: Path) -> None:
    texts = [f"document {i}" for i in range(50)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    first = _texts(load_text_dataset(str(tmp_path / "saved"), seed=3))
    again = _texts(load_text_dataset(str(tmp_path / "saved"), seed=3))
    streamed = _texts(load_text_dataset(str(tmp_path / "saved"), seed=3, streaming=True))
    assert first == again == streamed
    assert first != texts
    assert sorted(first) == sorted(texts)


# --- errors for paths that cannot be loaded ---------------------------------------------


@pytest.mark.parametrize("missing", ["/no/such/dir", "./missing", "~/no-such-sae-data", "x.jsonl"])
def test_nonexistent_local_path(missing: str) -> None:
    with pytest.raises(SAELensError, match=r"does not exist"):
        load_text_dataset(missing)


def test_unknown_builtin_lists_available_names() -> None:
    with pytest.raises(SAELensError, match=r"builtin:nope.*builtin:python-docs"):
        load_text_dataset("builtin:nope")


def test_hub_name_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these variables when imported, so patch the loaded config too;
    # otherwise the hub client retries the network for ~25 s before giving up.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(SAELensError) as raised:
        load_text_dataset("someone/no-such-dataset")
    assert time.perf_counter() - start < 10
    message = str(raised.value)
    assert "'someone/no-such-dataset' is not a local file or folder" in message
    assert "Hugging Face hub" in message
    assert "builtin:python-docs" in message
    assert "\n" not in message
