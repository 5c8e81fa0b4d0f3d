"""Activation caching (sae_lens/cached_activations.py, sae_lens/cli/cache.py) on the real all-MiniLM-L6-v2.

One cache is written per module (two hooks, 40 packed rows of 16 tokens in 10 shards of 4 rows, two
held-out rows) and compared with what the in-memory `ActivationsStore` computes for the same rows;
the other tests read it, copy it to damage it, or write small caches of their own.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from safetensors import safe_open

from sae_lens import cached_activations
from sae_lens.activations_store import ActivationsStore, DatasetExhausted
from sae_lens.cached_activations import (
    CacheActivationsRunnerConfig,
    CachedActivationsStore,
    cache_activations_runner,
    check_cache_matches,
    read_manifest,
)
from sae_lens.cli import main
from sae_lens.errors import SAELensError
from sae_lens.text_datasets import load_text_dataset
from tests.conftest import make_runner_config

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
CONTEXT = 16
ROWS_PER_SHARD = 4
N_ROWS = 40
N_TOKENS = N_ROWS * CONTEXT  # 640: no token is excluded (exclude_special_tokens is off)
N_SHARDS = N_ROWS // ROWS_PER_SHARD
N_EVAL = 2

_WORDS = [
    "river",
    "mountain",
    "quiet",
    "library",
    "python",
    "list",
    "tokenizer",
    "matrix",
    "weather",
    "sediment",
    "fox",
    "dog",
    "garden",
    "window",
    "engine",
    "music",
    "paper",
    "winter",
    "summer",
    "yellow",
    "green",
    "ancient",
    "modern",
    "small",
    "large",
    "reads",
    "builds",
    "carries",
    "changes",
    "opens",
    "follows",
    "under",
    "over",
    "near",
    "beside",
    "quickly",
    "slowly",
    "often",
    "never",
]


def write_corpus(path: Path, n_paragraphs: int = 60, seed: int = 0) -> Path:
    """Paragraphs of seeded random words (no two rows alike), one dataset row each."""
    rng = random.Random(seed)
    paragraphs = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n_paragraphs)
    ]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def cache_config(folder: Path, corpus: Path, **overrides: Any) -> CacheActivationsRunnerConfig:
    values: dict[str, Any] = {
        "hook_points": HOOKS,
        "dataset_path": str(corpus),
        "context_size": CONTEXT,
        "store_batch_size": 3,  # does not divide a shard's 4 rows: batches must restart at each shard
        "total_training_tokens": N_TOKENS,
        "shard_size_tokens": ROWS_PER_SHARD * CONTEXT - 5,  # rounded up to whole rows
        "n_eval_sequences": N_EVAL,
        "cached_activations_path": str(folder),
    }
    values.update(overrides)
    return CacheActivationsRunnerConfig(**values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def cache(minilm: Any, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's cache, written once without interruption."""
    folder = tmp_path_factory.mktemp("cache") / "acts"
    cache_activations_runner(cache_config(folder, corpus), model=minilm, show_progress=False)
    return folder


def shard_tensors(folder: Path, name: str) -> torch.Tensor:
    """Tensor `name` of every shard, concatenated in shard order."""
    manifest = read_manifest(folder)
    parts = []
    for entry in manifest["shards"]:
        with safe_open(str(folder / entry["file"]), framework="pt") as file:
            parts.append(file.get_tensor(name))
    return torch.cat(parts)


def row_key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


# -- writing ------------------------------------------------------------------------------------------


def test_cache_holds_the_in_memory_stores_activations(minilm: Any, corpus: Path, cache: Path) -> None:
    manifest = read_manifest(cache)
    assert manifest["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["hook_widths"] == {hook: 384 for hook in HOOKS}
    assert (manifest["dtype"], manifest["context_size"], manifest["n_tokens"]) == (
        "float32",
        CONTEXT,
        N_TOKENS,
    )
    assert manifest["sae_lens_version"] == cached_activations.library_version() != "unknown"
    assert manifest["complete"] and not manifest["dataset_exhausted"]
    assert [entry["n_tokens"] for entry in manifest["shards"]] == [ROWS_PER_SHARD * CONTEXT] * N_SHARDS
    for entry in manifest["shards"]:
        assert hashlib.sha256((cache / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]

    # The in-memory store over the same data: the same held-out rows first, then the same rows.
    store = ActivationsStore(
        minilm,
        load_text_dataset(str(corpus)),
        hook_points=HOOKS,
        context_size=CONTEXT,
        train_batch_size=32,
        n_eval_sequences=N_EVAL,
    )
    assert store.eval_tokens is not None
    assert torch.equal(torch.tensor(manifest["eval_tokens"]), store.eval_tokens)
    tokens = store.get_batch_tokens(N_ROWS)
    expected = store.kept_activations_by_hook(tokens)
    for hook in HOOKS:
        torch.testing.assert_close(shard_tensors(cache, hook), expected[hook], atol=1e-5, rtol=1e-5)
    assert torch.equal(shard_tensors(cache, "token_ids"), tokens.flatten())
    assert torch.equal(shard_tensors(cache, "positions"), torch.arange(CONTEXT).repeat(N_ROWS))
    assert torch.equal(shard_tensors(cache, "row_ids"), torch.arange(N_ROWS).repeat_interleave(CONTEXT))

    reader = CachedActivationsStore(cache, train_batch_size=32)
    assert reader.eval_tokens is not None and torch.equal(reader.eval_tokens, store.eval_tokens)
    held_out = reader.held_out_activations_by_hook()
    assert held_out is not None
    for hook, value in store.kept_activations_by_hook(store.eval_tokens).items():
        torch.testing.assert_close(held_out[hook], value, atol=1e-5, rtol=1e-5)


def test_resume_after_interruption_gives_the_same_shards(
    minilm: Any, corpus: Path, cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "acts"
    cfg = cache_config(folder, corpus)

    def stop_after_second_shard(index: int, manifest: dict[str, Any]) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_activations_runner(cfg, model=minilm, show_progress=False, on_shard=stop_after_second_shard)
    interrupted = read_manifest(folder)
    assert len(interrupted["shards"]) == 2 and not interrupted["complete"]
    assert interrupted["position"]["rows_consumed"] > 0
    # What a kill during the third shard leaves: a half-written temporary file, or a whole shard
    # written just before the manifest would have listed it. Neither may be taken as complete.
    stray = folder / ".shard_00002.safetensors.x1y2.tmp"
    stray.write_bytes(b"half a shard")
    (folder / "shard_00002.safetensors").write_bytes(b"not listed in the manifest")

    resumed = cache_activations_runner(cfg, model=minilm, show_progress=False)
    assert not stray.exists()
    reference = read_manifest(cache)
    assert [e["sha256"] for e in resumed["shards"]] == [e["sha256"] for e in reference["shards"]]
    assert resumed["n_tokens"] == N_TOKENS and resumed["complete"]
    assert resumed["position"] == reference["position"]

    # A finished cache is returned as it is (no model needed); a larger total extends it.
    assert cache_activations_runner(cfg, show_progress=False)["shards"] == resumed["shards"]
    extended = cache_activations_runner(
        cache_config(folder, corpus, total_training_tokens=N_TOKENS + 3 * CONTEXT),
        model=minilm,
        show_progress=False,
    )
    assert extended["shards"][:N_SHARDS] == resumed["shards"]
    assert extended["n_tokens"] == N_TOKENS + 3 * CONTEXT and len(extended["shards"]) == N_SHARDS + 1


def test_a_cache_of_other_settings_or_a_foreign_folder_is_not_resumed(
    minilm: Any, corpus: Path, cache: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    with pytest.raises(SAELensError, match=re.escape("context_size=16 (this config: 32)")):
        cache_activations_runner(
            cache_config(copy, corpus, context_size=32), model=minilm, show_progress=False
        )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SAELensError, match=re.escape("not empty and holds no manifest.json")):
        cache_activations_runner(cache_config(foreign, corpus), model=minilm, show_progress=False)
    # A run killed before its first manifest leaves only files of its own: those are started over.
    early = tmp_path / "early"
    early.mkdir()
    (early / "eval.safetensors").write_bytes(b"half")
    (early / ".manifest.json.abc.tmp").write_text("{")
    manifest = cache_activations_runner(
        cache_config(early, corpus, total_training_tokens=2 * CONTEXT), model=minilm, show_progress=False
    )
    assert manifest["n_tokens"] == 2 * CONTEXT
    assert sorted(p.name for p in early.iterdir()) == [
        "eval.safetensors",
        "manifest.json",
        "shard_00000.safetensors",
    ]


def test_dataset_shorter_than_the_total_ends_the_cache(minilm: Any, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "short.txt", n_paragraphs=6)
    manifest = cache_activations_runner(
        cache_config(tmp_path / "acts", corpus, total_training_tokens=10_000, exclude_special_tokens=True),
        model=minilm,
        show_progress=False,
    )
    assert manifest["dataset_exhausted"] and manifest["complete"]
    assert 0 < manifest["n_tokens"] == sum(entry["n_tokens"] for entry in manifest["shards"])
    # [CLS] opens every row and [SEP] separates documents: neither is kept.
    token_ids = shard_tensors(tmp_path / "acts", "token_ids")
    assert (
        token_ids.numel() == manifest["n_tokens"]
        and not torch.isin(token_ids, torch.tensor([101, 102])).any()
    )
    assert manifest["n_tokens"] < manifest["n_rows"] * CONTEXT


# -- reading ------------------------------------------------------------------------------------------


def cached_rows(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both hooks' activations of every cached token, and the shard each came from."""
    first, second = (shard_tensors(folder, hook) for hook in HOOKS)
    sizes = [entry["n_tokens"] for entry in read_manifest(folder)["shards"]]
    shard_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return first, second, shard_of


def test_reader_serves_every_row_once_per_pass_and_mixes_shards(cache: Path) -> None:
    first, second, shard_of = cached_rows(cache)
    where = {row_key(row): index for index, row in enumerate(first)}
    assert len(where) == N_TOKENS  # every cached token is a distinct row

    store = CachedActivationsStore(
        cache, train_batch_size=32, n_batches_in_buffer=4, n_open_shards=4, n_epochs=2
    )
    served: Counter[int] = Counter()
    shards_per_batch = []
    while True:
        try:
            batch = store.next_batch_by_hook()
        except DatasetExhausted:
            break
        assert store._buffer is not None and store._buffer.shape[0] <= store.buffer_size
        indices = [where[row_key(row)] for row in batch[HOOKS[0]]]
        # Both hooks' rows belong to the same tokens.
        assert torch.equal(batch[HOOKS[1]], second[indices])
        served.update(indices)
        shards_per_batch.append(len(set(shard_of[indices].tolist())))
    assert served == Counter({index: 2 for index in range(N_TOKENS)})  # two epochs, each row once each
    assert store.tokens_served == 2 * N_TOKENS
    # Stream order would give one shard per batch (a shard holds 64 rows, a batch 32).
    assert min(shards_per_batch) >= 3 and sum(shards_per_batch) / len(shards_per_batch) >= 4


def test_reader_memory_stays_bounded_with_shards_larger_than_the_buffer(cache: Path) -> None:
    store = CachedActivationsStore(cache, train_batch_size=8, n_batches_in_buffer=2, n_open_shards=2)
    slices = []
    read = store._source.read

    def recording_read(shard: int, start: int, stop: int, hooks: Any) -> list[torch.Tensor]:
        slices.append(stop - start)
        return read(shard, start, stop, hooks)

    store._source.read = recording_read  # type: ignore[method-assign,assignment]
    batches = list(store)
    assert sum(batch.shape[0] for batch in batches) == N_TOKENS
    # A shard holds 64 rows; the buffer 16. Nothing larger than the buffer is ever read at once.
    assert max(slices) <= store.buffer_size < ROWS_PER_SHARD * CONTEXT
    assert all(batch.shape == (8, 384) for batch in batches)


def test_state_dict_round_trip_continues_exactly(cache: Path, tmp_path: Path) -> None:
    def new_store() -> CachedActivationsStore:
        return CachedActivationsStore(
            cache, train_batch_size=32, hook_points=HOOKS, n_batches_in_buffer=4, n_open_shards=3, seed=7
        )

    store = new_store()
    for _ in range(7):  # past several refills, mid-epoch
        store.next_batch_by_hook()
    torch.save(store.state_dict(), tmp_path / "store.pt")
    rest = [store.next_batch_by_hook() for _ in range(13)]
    with pytest.raises(DatasetExhausted):
        store.next_batch()

    resumed = new_store()
    resumed.load_state_dict(torch.load(tmp_path / "store.pt", weights_only=True))
    assert resumed.tokens_served == 7 * 32
    for expected in rest:
        batch = resumed.next_batch_by_hook()
        for hook in HOOKS:
            assert torch.equal(batch[hook], expected[hook])
    with pytest.raises(DatasetExhausted):
        resumed.next_batch()

    state = torch.load(tmp_path / "store.pt", weights_only=True)
    with pytest.raises(SAELensError, match="reads"):
        CachedActivationsStore(cache, train_batch_size=32, hook_points=HOOKS[:1]).load_state_dict(state)
    with pytest.raises(SAELensError, match="rank 0 of 1, this one is rank 1 of 2"):
        CachedActivationsStore(
            cache, train_batch_size=32, hook_points=HOOKS, rank=1, world_size=2
        ).load_state_dict(state)


def test_ranks_read_disjoint_shards(cache: Path) -> None:
    first, _, shard_of = cached_rows(cache)
    where = {row_key(row): index for index, row in enumerate(first)}
    seen: list[set[int]] = []
    for rank in range(3):
        store = CachedActivationsStore(
            cache, train_batch_size=16, rank=rank, world_size=3, hook_points=HOOKS[:1]
        )
        assert store.shards == list(range(N_SHARDS))[rank::3]
        rows = {where[row_key(row)] for batch in store for row in batch}
        assert {int(shard_of[index]) for index in rows} == set(store.shards)
        seen.append(rows)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    with pytest.raises(SAELensError, match="10 shards, fewer than the 11 ranks"):
        CachedActivationsStore(cache, train_batch_size=16, rank=0, world_size=11)


def test_damaged_shards_are_detected(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(cache, copy)
    shard = copy / "shard_00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAELensError, match=r"shard_00003.safetensors is truncated \(\d+ of \d+ bytes\)"):
        CachedActivationsStore(copy, train_batch_size=32)

    # Same size, one byte flipped: found by the checksum when the shard is first read.
    corrupt = bytearray(data)
    corrupt[-100] ^= 0xFF
    shard.write_bytes(bytes(corrupt))
    store = CachedActivationsStore(copy, train_batch_size=32, n_open_shards=N_SHARDS)
    with pytest.raises(
        SAELensError, match=re.escape("shard_00003.safetensors is corrupt (its sha256 checksum")
    ):
        store.next_batch()

    (copy / "shard_00003.safetensors").unlink()
    with pytest.raises(SAELensError, match=re.escape("shard_00003.safetensors is missing")):
        CachedActivationsStore(copy, train_batch_size=32)


def test_mismatched_caches_are_refused(cache: Path) -> None:
    manifest = read_manifest(cache)
    check_cache_matches(manifest, model_name="all-MiniLM-L6-v2", hooks=HOOKS, d_in=384, dtype="float32")
    refusals: dict[str, tuple[dict[str, Any], str]] = {
        "model": (
            {"model_name": "gpt2"},
            "holds activations of model 'sentence-transformers/all-MiniLM-L6-v2', not 'gpt2'",
        ),
        "hook": (
            {"hooks": ["blocks.4.hook_resid_post"]},
            "no activations of hook 'blocks.4.hook_resid_post'",
        ),
        "d_in": ({"hooks": HOOKS, "d_in": 512}, "width 384, not d_in=512"),
        "dtype": ({"dtype": "bfloat16"}, "holds float32 activations, but dtype is bfloat16"),
    }
    for arguments, message in refusals.values():
        with pytest.raises(SAELensError, match=re.escape(message)) as raised:
            check_cache_matches(manifest, **arguments)
        assert "\n" not in str(raised.value)

    # The training config's view: from_config checks model, hooks, d_in and dtype.
    base = {"use_cached_activations": True, "cached_activations_path": str(cache), "train_batch_size": 32}
    store = CachedActivationsStore.from_config(
        make_runner_config(**base, hook_point=HOOKS[1], hook_point_out=HOOKS[0], d_in=384)
    )
    assert store.hook_points == [HOOKS[1], HOOKS[0]] and store.n_batches_in_buffer == 32
    with pytest.raises(SAELensError, match="not d_in=100"):
        CachedActivationsStore.from_config(make_runner_config(**base, hook_point=HOOKS[0], d_in=100))
    with pytest.raises(SAELensError, match=re.escape("no activations of hook 'blocks.3.hook_resid_post'")):
        CachedActivationsStore.from_config(make_runner_config(**base))
    with pytest.raises(SAELensError, match="does not exist"):
        CachedActivationsStore.from_config(
            make_runner_config(**{**base, "cached_activations_path": "/nonexistent"})
        )


def test_an_sae_trains_from_the_cache(cache: Path) -> None:
    from sae_lens import SAETrainer, SparseAutoencoder

    cfg = make_runner_config(
        hook_point=HOOKS[0], d_in=384, d_sae=768, k=8, train_batch_size=32, total_training_tokens=N_TOKENS
    )
    sae = SparseAutoencoder.from_config(cfg.sae_config(384))
    trainer = SAETrainer(cfg, sae, show_progress=False)
    trainer.fit(CachedActivationsStore(cache, train_batch_size=32, hook_points=HOOKS[:1]))
    assert trainer.n_tokens == N_TOKENS


def test_hf_dataset_of_activations(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, _ = cached_rows(cache)
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict(
        {
            HOOKS[0]: first.numpy(),
            HOOKS[1]: second.numpy(),
            "token_ids": shard_tensors(cache, "token_ids").numpy(),
        }
    ).save_to_disk(str(folder))
    # Blocks of 100 rows stand in for shards, so that the shuffle mixes several.
    monkeypatch.setattr(cached_activations, "ARROW_ROWS_PER_SHARD", 100)
    store = CachedActivationsStore(folder, train_batch_size=32, n_held_out_tokens=64, n_open_shards=3)
    assert store.hook_points == HOOKS and store.hook_widths == {hook: 384 for hook in HOOKS}
    assert store.dtype == torch.float32 and store.eval_tokens is None
    assert len(store.shards) == 6  # 576 training rows in blocks of 100
    held_out = store.held_out_activations_by_hook()
    assert held_out is not None and torch.equal(held_out[HOOKS[0]], first[:64])

    where = {row_key(row): index for index, row in enumerate(first)}
    served: Counter[int] = Counter()
    for _ in range((N_TOKENS - 64) // 32):
        batch = store.next_batch_by_hook()
        indices = [where[row_key(row)] for row in batch[HOOKS[0]]]
        assert torch.equal(batch[HOOKS[1]], second[indices])
        served.update(indices)
    assert served == Counter(range(64, N_TOKENS))
    with pytest.raises(DatasetExhausted):
        store.next_batch()

    check_cache_matches(store.manifest, model_name="gpt2")  # an HF dataset records no model
    with pytest.raises(SAELensError, match=re.escape("no activations of hook 'blocks.2.hook_resid_post'")):
        CachedActivationsStore(
            folder, train_batch_size=32, n_held_out_tokens=64, hook_points=["blocks.2.hook_resid_post"]
        )
    with pytest.raises(SAELensError, match="bfloat16"):
        CachedActivationsStore(folder, train_batch_size=32, n_held_out_tokens=64, dtype="bfloat16")


# -- the command line ---------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    code = main(["cache", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_and_verifies_a_cache(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cli"
    code, out, err = run_cli(
        capsys,
        "--cached_activations_path", str(folder),
        "--dataset_path", str(corpus),
        "--hook_points", "blocks.0.hook_resid_post",
        "--context_size", "16",
        "--total_training_tokens", "64",
        "--shard_size_tokens", "32",
        "--n_eval_sequences", "1",
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "Cached 64 tokens in 2 shards" in out
    manifest = read_manifest(folder)
    assert manifest["hook_points"] == ["blocks.0.hook_resid_post"] and len(manifest["eval_tokens"]) == 1
    code, out, err = run_cli(
        capsys, "--verify", "--cached_activations_path", str(folder), "--model_name", "all-MiniLM-L6-v2"
    )
    assert code == 0 and "every checksum matches; complete" in out, err


def test_cli_bad_input_is_one_line_and_exit_2(
    corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    shard = damaged / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    small = ["--dataset_path", str(corpus), "--total_training_tokens", "64", "--quiet"]
    cases = {
        "missing cache": (["--verify", "--cached_activations_path", "/nonexistent/cache"], "does not exist"),
        "corrupt shard": (["--verify", "--cached_activations_path", str(damaged)], "checksum does not match"),
        "other model": (
            ["--verify", "--cached_activations_path", str(cache), "--model_name", "gpt2"],
            "not 'gpt2'",
        ),
        "other hook": (
            ["--verify", "--cached_activations_path", str(cache), "--hook_points", "blocks.5.hook_mlp_out"],
            "no activations of hook 'blocks.5.hook_mlp_out'",
        ),
        "other dtype": (
            ["--verify", "--cached_activations_path", str(cache), "--dtype", "float16"],
            "dtype is float16",
        ),
        "unwritable output": (
            ["--cached_activations_path", str(blocker / "cache"), *small],
            "cannot be written",
        ),
        "context too long": (
            ["--cached_activations_path", str(tmp_path / "long"), "--context_size", "1000", *small],
            "context_size 1000 exceeds",
        ),
        "bad hook list": (
            ["--cached_activations_path", str(tmp_path / "x"), "--hook_points", ","],
            "hook_points",
        ),
        "unknown flag": (["--lrr", "1"], "unknown config key 'lrr'"),
    }
    for name, (arguments, message) in cases.items():
        if name == "unknown flag":
            with pytest.raises(SystemExit) as exited:
                run_cli(capsys, *arguments)
            code, err = int(exited.value.code or 0), capsys.readouterr().err
        else:
            code, _, err = run_cli(capsys, *arguments)
        assert code == 2, (name, err)
        assert err.startswith("sae-lens: error:") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
    assert not (tmp_path / "long").exists() or not any((tmp_path / "long").iterdir())
