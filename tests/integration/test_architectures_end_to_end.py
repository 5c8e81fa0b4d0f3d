"""Every registered architecture trains through `language_model_sae_runner` on the real MiniLM and
saves a folder that loads back with the same outputs. (The bf16 autocast step of each architecture is
tested in tests/training/test_trainer.py, which uses the settings below.)"""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import datasets
import pytest
import torch

from sae_lens import SparseAutoencoder, train_sae
from sae_lens.saes import registered_architectures
from tests.conftest import make_runner_config

# Per-architecture settings that make a 40-step run learn; everything else is shared.
SETTINGS: dict[str, dict[str, Any]] = {
    "standard": {"l1_coefficient": 1e-2},
    "topk": {"k": 16},
    "batchtopk": {"k": 16},
    "matryoshka_batchtopk": {"k": 16, "matryoshka_widths": [64, 256, 1536]},
    "jumprelu": {"l1_coefficient": 1e-3, "jumprelu_init_threshold": 0.01, "jumprelu_bandwidth": 0.05},
    "gated": {"l1_coefficient": 1e-2},
}


def test_settings_cover_every_registered_architecture() -> None:
    assert set(SETTINGS) == set(registered_architectures())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("corpus") / "topics"
    datasets.Dataset.from_dict({"text": list(topics.values())}).save_to_disk(str(folder))
    return str(folder)


@pytest.mark.parametrize("architecture", sorted(SETTINGS))
def test_runner_trains_saves_and_reloads(architecture: str, minilm: Any, corpus: str, tmp_path: Path) -> None:
    cfg = make_runner_config(
        hook_point="blocks.1.hook_resid_post",
        dataset_path=corpus,
        architecture=architecture,
        expansion_factor=4,
        total_training_tokens=20_480,
        train_batch_size=512,
        context_size=64,
        store_batch_size=16,
        n_batches_in_buffer=4,
        n_eval_sequences=8,
        lr=2e-3,
        checkpoint_path=str(tmp_path),
        run_name=architecture,
        **SETTINGS[architecture],
    )
    result = train_sae(cfg, model=minilm, show_progress=False)
    assert result.tokens_trained == 20_480
    # From an untrained SAE (explained variance near or below 0) to a clearly useful one.
    assert result.metrics["explained_variance"] > 0.4, result.metrics
    assert 0 < result.metrics["l0"] < result.sae.cfg.d_sae

    loaded = SparseAutoencoder.load_from_disk(result.output_dir)
    x = torch.randn(64, 384) * 3
    result.sae.eval()
    torch.testing.assert_close(loaded(x), result.sae(x))
    # BatchTopK-style SAEs are saved as JumpReLU, as SAELens does; the rest keep their name.
    expected = "jumprelu" if "batchtopk" in architecture else architecture
    assert loaded.cfg.architecture == expected
