"""End-to-end training runs on the real all-MiniLM-L6-v2 (and the tiny GPT-2), with real datasets on
disk, real output folders and wandb in offline mode."""

from __future__ import annotations

import json
import math
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import datasets
import pytest
import torch
import yaml

from sae_lens import LanguageModelSAERunnerConfig, language_model_sae_runner, train_sae
from sae_lens.activations_store import ActivationsStore
from sae_lens.errors import SAELensError
from sae_lens.evals import reconstruction_metrics
from sae_lens.runner import RunResult, held_out_activations
from sae_lens.saes import SparseAutoencoder
from tests.conftest import make_runner_config

HOOK = "blocks.1.hook_resid_post"
SHORT_DOCS = [
    "The cat sat on the mat.",
    "Dogs bark at night.",
    "Rain fell on the quiet town.",
    "She wrote a letter to her friend.",
    "Bread is baked in an oven.",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A save_to_disk folder of real English text (the language reference topics of CPython)."""
    folder = tmp_path_factory.mktemp("corpus") / "topics"
    datasets.Dataset.from_dict({"text": list(topics.values())}).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def short_docs_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Five short documents: a few rows of 16 tokens, far fewer than any run asks for."""
    folder = tmp_path_factory.mktemp("short") / "docs"
    datasets.Dataset.from_dict({"text": SHORT_DOCS}).save_to_disk(str(folder))
    return str(folder)


def make_cfg(dataset_path: str, checkpoint_path: Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
    values: dict[str, Any] = {
        "hook_point": HOOK,
        "dataset_path": dataset_path,
        "total_training_tokens": 20_000,
        "train_batch_size": 512,
        "context_size": 64,
        "n_eval_sequences": 8,
        "store_batch_size": 16,
        "n_batches_in_buffer": 4,
        "expansion_factor": 4,
        "wandb_log_frequency": 5,
        "checkpoint_path": str(checkpoint_path),
    }
    values.update(overrides)
    return make_runner_config(**values)


def short_cfg(short_docs_dir: str, checkpoint_path: Path, **overrides: Any) -> LanguageModelSAERunnerConfig:
    values: dict[str, Any] = {
        "context_size": 16,
        "n_eval_sequences": 1,
        "train_batch_size": 16,
        "store_batch_size": 2,
        "n_batches_in_buffer": 2,
        "total_training_tokens": 10_000,
    }
    values.update(overrides)
    return make_cfg(short_docs_dir, checkpoint_path, **values)


RUNS = {
    "standard": {"architecture": "standard", "lr": 2e-3, "l1_coefficient": 1e-2},
    "topk": {"architecture": "topk", "lr": 2e-3, "k": 16},
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(
    request: pytest.FixtureRequest, minilm: Any, corpus_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LanguageModelSAERunnerConfig, RunResult]:
    name = request.param
    cfg = make_cfg(corpus_dir, tmp_path_factory.mktemp(name), run_name=name, **RUNS[name])
    return cfg, train_sae(cfg, model=minilm, show_progress=False)


def test_training_raises_explained_variance(
    run: tuple[LanguageModelSAERunnerConfig, RunResult], minilm: Any
) -> None:
    cfg, result = run
    assert result.tokens_trained == cfg.total_training_steps * cfg.train_batch_size
    assert not result.ran_out_of_data
    # The same held-out activations the run evaluated on: the first n_eval_sequences rows.
    store = ActivationsStore.from_config(minilm, cfg)
    assert store.eval_tokens is not None
    acts = held_out_activations(store, store.eval_tokens)
    torch.manual_seed(cfg.seed)
    untrained = SparseAutoencoder.from_config(cfg.sae_config(384))
    before = reconstruction_metrics(untrained, acts)
    after = reconstruction_metrics(result.sae, acts)
    assert after["explained_variance"] > 0.5
    assert after["explained_variance"] > before["explained_variance"] + 0.3
    assert after["explained_variance"] == pytest.approx(result.metrics["explained_variance"], abs=1e-4)
    assert result.metrics["l0"] == pytest.approx(after["l0"], rel=1e-4)
    assert 0 < after["l0"] < result.sae.cfg.d_sae
    if cfg.architecture == "topk":
        assert after["l0"] <= 16
    # Encoder model: the downstream metric is the embedding cosine, and the SAE beats ablation.
    assert result.metrics["embedding_cosine_with_sae"] > result.metrics["embedding_cosine_zero_ablated"]
    assert 0 < result.metrics["embedding_cosine_score"] <= 1


def test_output_folder(run: tuple[LanguageModelSAERunnerConfig, RunResult]) -> None:
    cfg, result = run
    folder = result.output_dir
    assert folder == Path(cfg.checkpoint_path) / cfg.architecture
    for name in (
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "metrics.jsonl",
        "training_config.yaml",
    ):
        assert (folder / name).is_file(), name
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "l0" in line and "explained_variance" in line]
    assert len(logged) >= 5
    assert [line["step"] for line in logged] == sorted(line["step"] for line in logged)
    assert logged[-1]["step"] == cfg.total_training_steps
    saved_cfg = yaml.safe_load((folder / "training_config.yaml").read_text())
    assert saved_cfg["architecture"] == cfg.architecture
    assert saved_cfg["total_training_tokens"] == cfg.total_training_tokens
    assert LanguageModelSAERunnerConfig.from_yaml(folder / "training_config.yaml") == cfg
    sae_cfg = json.loads((folder / "cfg.json").read_text())
    assert sae_cfg["d_in"] == 384
    assert sae_cfg["d_sae"] == 4 * 384
    assert sae_cfg["metadata"]["hook_name"] == HOOK


def test_saved_sae_loads_equal(run: tuple[LanguageModelSAERunnerConfig, RunResult]) -> None:
    _, result = run
    loaded = SparseAutoencoder.load_from_disk(result.output_dir)
    assert type(loaded) is type(result.sae)
    assert loaded.cfg.d_in == result.sae.cfg.d_in
    assert loaded.cfg.d_sae == result.sae.cfg.d_sae
    # Only TopK-family configs have a k; a standard SAE's config has none at all.
    assert getattr(loaded.cfg, "k", None) == getattr(result.sae.cfg, "k", None)
    assert hasattr(loaded.cfg, "k") == (result.sae.cfg.architecture == "topk")
    original = result.sae.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0)
    x = torch.randn(8, 384)
    torch.testing.assert_close(loaded(x), result.sae(x))


def test_run_that_runs_out_of_data_saves_what_it_trained(
    minilm: Any, short_docs_dir: str, tmp_path: Path
) -> None:
    cfg = short_cfg(short_docs_dir, tmp_path, run_name="short")
    result = train_sae(cfg, model=minilm, show_progress=False)
    assert result.ran_out_of_data
    assert 0 < result.tokens_trained < cfg.total_training_tokens
    assert (result.output_dir / "sae_weights.safetensors").is_file()
    assert (result.output_dir / "sparsity.safetensors").is_file()
    loaded = SparseAutoencoder.load_from_disk(result.output_dir)
    torch.testing.assert_close(loaded.W_dec, result.sae.W_dec)


def test_dataset_with_only_eval_rows_is_a_clear_error(
    minilm: Any, short_docs_dir: str, tmp_path: Path
) -> None:
    cfg = short_cfg(short_docs_dir, tmp_path, n_eval_sequences=32)
    with pytest.raises(SAELensError, match="no activations"):
        train_sae(cfg, model=minilm, show_progress=False)


def test_dataset_shorter_than_one_row_is_a_clear_error(minilm: Any, tmp_path: Path) -> None:
    folder = tmp_path / "one_doc"
    datasets.Dataset.from_dict({"text": ["hello world."]}).save_to_disk(str(folder))
    cfg = short_cfg(str(folder), tmp_path)
    with pytest.raises(SAELensError, match="too short"):
        train_sae(cfg, model=minilm, show_progress=False)


def test_d_in_mismatch_is_an_error(minilm: Any, short_docs_dir: str, tmp_path: Path) -> None:
    cfg = short_cfg(short_docs_dir, tmp_path, d_in=100)
    with pytest.raises(SAELensError, match=r"d_in=100.*384"):
        train_sae(cfg, model=minilm, show_progress=False)


def test_wandb_offline_run_is_written_under_the_output_folder(
    minilm: Any, short_docs_dir: str, tmp_path: Path, offline_env: dict[str, str]
) -> None:
    assert offline_env["WANDB_MODE"] == "offline"
    cfg = short_cfg(short_docs_dir, tmp_path, run_name="wandb_run", log_to_wandb=True)
    result = train_sae(cfg, model=minilm, show_progress=False)
    runs = sorted((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert runs[0].is_dir()
    assert list(runs[0].glob("*.wandb"))
    assert (result.output_dir / "metrics.jsonl").is_file()


def test_language_model_sae_runner_on_a_causal_lm(
    tiny_gpt2_dir: Path, tiny_corpus_text: str, tmp_path: Path
) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(tiny_corpus_text)
    cfg = make_runner_config(
        model_name=str(tiny_gpt2_dir),
        hook_point="blocks.0.hook_resid_post",
        dataset_path=str(data),
        architecture="topk",
        k=8,
        expansion_factor=4,
        context_size=32,
        n_eval_sequences=4,
        train_batch_size=128,
        store_batch_size=8,
        n_batches_in_buffer=4,
        total_training_tokens=2048,
        wandb_log_frequency=4,
        checkpoint_path=str(tmp_path / "out"),
        run_name="gpt2",
    )
    sae = language_model_sae_runner(cfg)
    assert isinstance(sae, SparseAutoencoder)
    assert sae.cfg.d_in == 64
    folder = tmp_path / "out" / "gpt2"
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    final = [line for line in lines if "eval/ce_score" in line]
    assert final
    assert final[-1]["eval/ce_loss_clean"] < final[-1]["eval/ce_loss_zero_ablated"]
    loaded = SparseAutoencoder.load_from_disk(folder)
    torch.testing.assert_close(loaded.W_enc, sae.W_enc)


@pytest.mark.parametrize(("head_index", "d_in"), [(None, 64), (1, 16)])
def test_runner_trains_on_attention_head_outputs(
    head_index: int | None,
    d_in: int,
    tiny_gpt2: Any,
    tiny_gpt2_dir: Path,
    tiny_corpus_text: str,
    tmp_path: Path,
) -> None:
    """`attn.hook_z` is `[batch, pos, n_heads, d_head]`: the SAE trains on all heads concatenated
    (d_in = 4 * 16), or on one head with `hook_point_head_index`, and is evaluated spliced the same way."""
    data = tmp_path / "corpus.txt"
    data.write_text(tiny_corpus_text)
    cfg = make_runner_config(
        model_name=str(tiny_gpt2_dir),
        hook_point="blocks.0.attn.hook_z",
        hook_point_head_index=head_index,
        dataset_path=str(data),
        architecture="topk",
        k=4,
        expansion_factor=2,
        context_size=32,
        n_eval_sequences=4,
        train_batch_size=128,
        store_batch_size=8,
        n_batches_in_buffer=4,
        total_training_tokens=1024,
        checkpoint_path=str(tmp_path / "out"),
        run_name="hook_z",
    )
    result = train_sae(cfg, model=tiny_gpt2, show_progress=False)
    assert result.sae.cfg.d_in == d_in and result.sae.cfg.d_sae == 2 * d_in
    assert result.sae.cfg.metadata["hook_name"] == "blocks.0.attn.hook_z"
    assert result.sae.cfg.metadata["hook_head_index"] == head_index
    assert result.tokens_trained == 1024
    assert math.isfinite(result.metrics["ce_score"]) and math.isfinite(result.metrics["kl_score"])
    assert 0 < result.metrics["l0"] <= 4
    loaded = SparseAutoencoder.load_from_disk(result.output_dir)
    assert loaded.cfg.metadata["hook_head_index"] == head_index
