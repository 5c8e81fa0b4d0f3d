"""ActivationsStore on the real all-MiniLM-L6-v2 (BERT tokenizer: [CLS]=101, [SEP]=102, [PAD]=0)."""

from __future__ import annotations

import itertools
from typing import Any

import datasets
import pytest
import torch

from sae_lens.activations_store import ActivationsStore, DatasetExhausted
from sae_lens.errors import SAELensError
from tests.conftest import make_runner_config

CLS, SEP, PAD = 101, 102, 0
HOOK = "blocks.0.hook_resid_post"
CONTEXT = 16

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "A short one.",
    "Python lists are mutable sequences, typically used to store collections of items.",
    "The weather in the mountains changes quickly during the afternoon.",
    "Tokenizers split text into word pieces before the model sees it.",
    "Every packed row should open with the classification token.",
    "Rivers carry sediment from the hills down to the sea over many years.",
    "Matrix multiplication dominates the cost of a transformer forward pass.",
    "Libraries are quiet places where people read and study together.",
]


def make_store(model: Any, docs: list[str] | None = None, **overrides: Any) -> ActivationsStore:
    options: dict[str, Any] = {
        "hook_point": HOOK,
        "hook_layer": 0,
        "context_size": CONTEXT,
        "train_batch_size": 32,
        "store_batch_size": 4,
        "n_batches_in_buffer": 4,
    }
    options.update(overrides)
    dataset = datasets.Dataset.from_dict({"text": docs if docs is not None else DOCS})
    return ActivationsStore(model, dataset, **options)


def token_rows(store: ActivationsStore) -> list[torch.Tensor]:
    """Every packed row the store has not used yet (the store's own row stream, consumed)."""
    rows = []
    while (row := store.next_token_row()) is not None:
        rows.append(row)
    return rows


def document_stream(model: Any, docs: list[str]) -> list[int]:
    """The documents' token ids joined by [SEP], as packing should lay them out."""
    stream: list[int] = []
    for ids in model.tokenizer(docs, add_special_tokens=False)["input_ids"]:
        if stream:
            stream.append(SEP)
        stream.extend(ids)
    return stream


def drain(store: ActivationsStore) -> torch.Tensor:
    """Every activation the store serves for training, `[n, d_in]`."""
    return torch.cat(list(store))


def nearest_distances(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the distance to and index of the closest key row."""
    distances = torch.cdist(queries.double(), keys.double())
    return distances.min(dim=1)


# -- packing ------------------------------------------------------------------------------------


def test_rows_open_with_cls_and_reproduce_the_documents(minilm: Any) -> None:
    store = make_store(minilm)
    rows = token_rows(store)
    assert len(rows) >= 5
    assert all(row.shape == (CONTEXT,) for row in rows)
    assert all(row[0].item() == CLS for row in rows)
    # The row bodies, concatenated, are the tokenized documents in order, [SEP] between them.
    bodies = [token for row in rows for token in row[1:].tolist()]
    stream = document_stream(minilm, DOCS)
    assert bodies == stream[: len(bodies)]
    assert len(stream) - len(bodies) < CONTEXT - 1  # only a last partial row is dropped
    assert bodies.count(SEP) == sum(1 for token in stream[: len(bodies)] if token == SEP) >= 5
    assert CLS not in bodies


def test_rows_without_prepend_bos_have_no_start_token(minilm: Any) -> None:
    store = make_store(minilm, prepend_bos=False)
    rows = token_rows(store)
    assert all(row.shape == (CONTEXT,) for row in rows)
    flat = torch.cat(rows).tolist()
    assert CLS not in flat
    stream = document_stream(minilm, DOCS)
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < CONTEXT


def test_pretokenized_rows_of_context_size_are_used_as_is(minilm: Any) -> None:
    # Rows that do not start with [CLS]: the store must not add, drop or reorder anything.
    rows = [list(range(1000 + 16 * i, 1016 + 16 * i)) for i in range(6)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    cfg = make_runner_config(hook_point=HOOK, context_size=CONTEXT, n_eval_sequences=2, train_batch_size=32)
    store = ActivationsStore.from_config(minilm, cfg, dataset=dataset)
    assert store.is_tokenized
    assert store.eval_tokens is not None
    assert store.eval_tokens.tolist() == rows[:2]
    # (The store's row stream continues after the held-out rows.)
    assert store.eval_tokens.tolist() + [row.tolist() for row in token_rows(store)] == rows


def test_is_dataset_tokenized_mismatch_is_an_error(minilm: Any) -> None:
    text = datasets.Dataset.from_dict({"text": DOCS})
    cfg = make_runner_config(hook_point=HOOK, context_size=CONTEXT, is_dataset_tokenized=True)
    with pytest.raises(SAELensError, match="is_dataset_tokenized"):
        ActivationsStore.from_config(minilm, cfg, dataset=text)
    tokens = datasets.Dataset.from_dict({"tokens": [list(range(1000, 1016))]})
    cfg = make_runner_config(hook_point=HOOK, context_size=CONTEXT, is_dataset_tokenized=False)
    with pytest.raises(SAELensError, match="token ids"):
        ActivationsStore.from_config(minilm, cfg, dataset=tokens)


# -- which tokens become activations ------------------------------------------------------------


def test_exclude_special_tokens_drops_cls_and_sep(minilm: Any) -> None:
    rows = torch.stack(token_rows(make_store(minilm)))
    n_special = int(torch.isin(rows, torch.tensor([CLS, SEP])).sum())
    assert n_special > rows.shape[0]  # every row's [CLS] plus the separators

    kept = drain(make_store(minilm, exclude_special_tokens=True, train_batch_size=1))
    assert kept.shape == (rows.numel() - n_special, 384)

    everything = drain(make_store(minilm, train_batch_size=1))
    assert everything.shape == (rows.numel(), 384)

    # The dropped activations are exactly those at special positions.
    acts = make_store(minilm).get_activations(rows)
    special = torch.isin(rows, torch.tensor([CLS, SEP]))
    dist, _ = nearest_distances(acts[special], kept)
    assert dist.min() > 1e-3
    dist, _ = nearest_distances(acts[~special], kept)
    assert dist.max() < 1e-4


def test_padding_is_always_excluded(minilm: Any) -> None:
    rows = []
    for i in range(4):
        length = 8 + i
        rows.append([CLS, *range(2000 + 10 * i, 2000 + 10 * i + length - 1), *[PAD] * (CONTEXT - length)])
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    n_real = sum(1 for row in rows for token in row if token != PAD)
    store = ActivationsStore(
        minilm,
        dataset,
        hook_point=HOOK,
        hook_layer=0,
        context_size=CONTEXT,
        train_batch_size=1,
        store_batch_size=2,
        column="input_ids",
        is_tokenized=True,
        exclude_special_tokens=False,
    )
    assert drain(store).shape == (n_real, 384)


# -- batches ------------------------------------------------------------------------------------


def test_next_batch_shape(minilm: Any) -> None:
    store = make_store(minilm, DOCS * 3)
    batch = store.next_batch()
    assert batch.shape == (32, 384)
    assert batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    assert store.tokens_served == 32


def test_batches_are_shuffled_across_rows(minilm: Any) -> None:
    docs = [f"{doc} (copy {i})" for i in range(4) for doc in DOCS]
    store = make_store(minilm, docs)
    rows = torch.stack(token_rows(make_store(minilm, docs)))
    sequential = torch.cat([store.get_activations(rows[i : i + 4]) for i in range(0, len(rows), 4)])
    sequential = sequential.reshape(-1, 384)

    batch = store.next_batch()
    dist, index = nearest_distances(batch, sequential)
    assert dist.max() < 1e-4  # every served activation is a real activation of the stream ...
    positions = index.tolist()
    assert len(set(positions)) == len(positions)
    assert positions != list(range(len(positions)))  # ... but not the first ones in stream order
    assert positions != sorted(positions)
    source_rows = {p // CONTEXT for p in positions}
    assert len(source_rows) >= 5  # a batch of 32 mixes tokens of many rows
    # The buffer (4 batches of 32) is filled from two store batches of 4 rows before serving.
    assert max(positions) >= 4 * CONTEXT


def test_eval_rows_are_held_out_from_training(minilm: Any) -> None:
    # The first rows hold words found nowhere else, so their activations are unlike any other.
    distinctive = (
        "zebra giraffe elephant kangaroo penguin dolphin tiger lion panda koala otter walrus camel "
        "llama bison moose beaver badger ferret hamster rabbit squirrel turtle lizard cobra falcon"
    )
    docs = [distinctive, *DOCS, *DOCS]
    store = make_store(minilm, docs, n_eval_sequences=2, train_batch_size=1)
    first_rows = token_rows(make_store(minilm, docs))
    assert store.eval_tokens is not None
    assert store.eval_tokens.shape == (2, CONTEXT)
    assert store.eval_tokens.tolist() == [row.tolist() for row in first_rows[:2]]

    eval_acts = store.get_activations(store.eval_tokens).reshape(-1, 384)
    trained = drain(store)
    assert trained.shape[0] == (len(first_rows) - 2) * CONTEXT
    dist, _ = nearest_distances(eval_acts, trained)
    assert dist.min() > 1e-3  # no held-out activation is ever served for training


def test_exhaustion_stops_iteration_then_raises(minilm: Any) -> None:
    store = make_store(minilm, train_batch_size=16)
    n_tokens = len(token_rows(make_store(minilm, train_batch_size=16))) * CONTEXT
    batches = list(store)  # stops cleanly at the end of the dataset
    assert batches
    assert all(batch.shape == (16, 384) for batch in batches)
    served = sum(batch.shape[0] for batch in batches)
    assert n_tokens - 16 < served <= n_tokens
    with pytest.raises(DatasetExhausted):
        store.next_batch()
    with pytest.raises(DatasetExhausted):
        store.get_batch_tokens()


def test_a_dataset_too_short_for_one_row_is_exhausted_at_once(minilm: Any) -> None:
    store = make_store(minilm, ["tiny."])
    with pytest.raises(DatasetExhausted):
        store.next_batch()
    assert list(store) == []


# -- configuration --------------------------------------------------------------------------------


def test_from_config_honours_the_dtype(minilm: Any) -> None:
    cfg = make_runner_config(
        hook_point=HOOK,
        context_size=CONTEXT,
        dtype="bfloat16",
        train_batch_size=32,
        store_batch_size=4,
        n_batches_in_buffer=2,
        n_eval_sequences=0,
    )
    store = ActivationsStore.from_config(minilm, cfg, dataset=datasets.Dataset.from_dict({"text": DOCS * 2}))
    assert store.dtype == torch.bfloat16
    batch = store.next_batch()
    assert batch.shape == (32, 384) and batch.dtype == torch.bfloat16
    assert torch.isfinite(batch.float()).all()


def test_buffer_size_defaults_agree_between_the_store_and_the_config() -> None:
    import dataclasses
    import inspect

    from sae_lens.config import LanguageModelSAERunnerConfig

    store_defaults = inspect.signature(ActivationsStore.__init__).parameters
    config_defaults = {f.name: f.default for f in dataclasses.fields(LanguageModelSAERunnerConfig)}
    for name in ("n_batches_in_buffer", "store_batch_size"):
        assert store_defaults[name].default == config_defaults[name], name


def test_empty_and_whitespace_documents_put_no_separators_back_to_back(minilm: Any) -> None:
    blank = ["", "   ", "\n\t", " \n "]
    docs = [" "]  # even before the first document
    for i, doc in enumerate(DOCS):
        docs += [doc, blank[i % len(blank)]]
    rows = torch.stack(token_rows(make_store(minilm, docs)))
    flat = rows[:, 1:].flatten().tolist()
    assert all(not (a == SEP and b == SEP) for a, b in itertools.pairwise(flat))
    assert all(row[1].item() != SEP for row in rows)  # no row body opens with a separator
    # The packed stream is exactly that of the non-empty documents.
    stream = document_stream(minilm, DOCS)
    assert flat == stream[: len(flat)]


def test_empty_pretokenized_documents_put_no_separators_back_to_back(minilm: Any) -> None:
    ids = [list(range(1000 + 5 * i, 1005 + 5 * i)) for i in range(8)]
    with_empty = [part for doc in ids for part in (doc, [])]
    store = ActivationsStore(
        minilm,
        datasets.Dataset.from_dict({"input_ids": with_empty}),
        hook_point=HOOK,
        hook_layer=0,
        context_size=CONTEXT,
        train_batch_size=16,
        column="input_ids",
        is_tokenized=True,
    )
    flat = [token for row in token_rows(store) for token in row[1:].tolist()]
    expected = [token for doc in ids for token in [*doc, SEP]][: len(flat)]
    assert flat == expected and len(flat) >= 2 * (CONTEXT - 1)
