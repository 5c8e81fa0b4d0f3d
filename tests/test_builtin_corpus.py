"""The embedded builtin:python-docs corpus (sae_lens/builtin_corpus.py): its contents, its cache, and
loading it through `load_text_dataset` (offline)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest

from sae_lens.builtin_corpus import (
    build_python_docs_texts,
    python_docs_cache_dir,
    python_docs_dataset,
)
from sae_lens.text_datasets import detect_column, load_text_dataset


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Streaming converts nothing, but keep anything `datasets` writes out of the home folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="session")
def python_docs_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point SAE_LENS_CACHE at a temp folder and build the corpus there, once per session."""
    cache = tmp_path_factory.mktemp("sae_lens_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAE_LENS_CACHE", str(cache))
        python_docs_dataset()
        yield cache


# --- builtin:python-docs --------------------------------------------------------------


def test_builtin_corpus_contents(python_docs_cache: Path) -> None:
    dataset = load_text_dataset("builtin:python-docs")
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["text"]
    assert detect_column(dataset) == ("text", False)
    texts = list(dataset["text"])
    assert sum(len(text) for text in texts) > 1_500_000
    assert len(set(texts)) == len(texts)
    assert all(text.strip() for text in texts)
    # Cached under SAE_LENS_CACHE (a temp folder here), not the home folder.
    assert python_docs_cache_dir().parent == python_docs_cache / "builtin"
    assert python_docs_cache_dir().is_dir()


def test_builtin_corpus_is_cached_and_deterministic(python_docs_cache: Path) -> None:
    cached_files = sorted(p.name for p in python_docs_cache_dir().iterdir())
    start = time.perf_counter()
    cached = list(python_docs_dataset()["text"])
    assert time.perf_counter() - start < 1.0
    assert sorted(p.name for p in python_docs_cache_dir().iterdir()) == cached_files
    # A fresh extraction (new child interpreter) gives exactly the cached corpus.
    assert build_python_docs_texts() == cached


def test_builtin_corpus_streaming(python_docs_cache: Path) -> None:
    stream = load_text_dataset("builtin:python-docs", streaming=True, seed=0)
    assert isinstance(stream, datasets.IterableDataset)
    first = next(iter(stream))
    assert isinstance(first["text"], str) and first["text"]
