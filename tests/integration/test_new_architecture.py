"""Adding an architecture touches only its own file.

A toy architecture is declared here exactly as a new file in `sae_lens/saes/` would declare it: a
config dataclass with one new option (default, check, docstring) and a registered subclass. Without
any other change, the runner config routes its option, `sae-lens train --help` lists it, YAML carries
it, the trainer trains it and a saved folder loads back as it. It is unregistered after each test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens.cli import build_parser, config_from_args
from sae_lens.config_fields import option, positive
from sae_lens.errors import SAELensError
from sae_lens.saes import SAEConfig, SparseAutoencoder, TrainingBatch, register_architecture
from sae_lens.saes import sae as sae_module
from sae_lens.saes.sae import registered_architectures
from sae_lens.training import SAETrainer
from tests.conftest import make_runner_config

NAME = "toy_test_arch"


@dataclass
class ToySAEConfig(SAEConfig):
    """A ReLU SAE whose latents are all multiplied by one factor."""

    toy_scale: float = option(1.0, positive)
    """Factor applied to every latent (the toy architecture's own option)."""


@pytest.fixture
def toy() -> Iterator[type[SparseAutoencoder]]:
    """The toy architecture, registered for one test."""

    @register_architecture(NAME)
    class ToySAE(SparseAutoencoder):
        """ReLU latents times `toy_scale`; the extra loss `toy` is the mean latent."""

        config_class = ToySAEConfig
        cfg: ToySAEConfig

        def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
            return torch.relu(hidden_pre) * self.cfg.toy_scale

        def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
            return {"toy": batch.feature_acts.mean()}

    try:
        yield ToySAE
    finally:
        sae_module._REGISTRY.pop(NAME, None)


def toy_cfg(**values: Any) -> Any:
    return make_runner_config(architecture=NAME, toy_scale=2.5, d_in=8, d_sae=16, **values)


def test_the_runner_config_routes_the_new_option(toy: type[SparseAutoencoder]) -> None:
    assert NAME in registered_architectures()
    cfg = toy_cfg()
    assert cfg.sae_options["toy_scale"] == 2.5 and cfg.toy_scale == 2.5
    sae_cfg = cfg.sae_config()
    assert type(sae_cfg) is ToySAEConfig and sae_cfg.toy_scale == 2.5
    assert make_runner_config(architecture=NAME).sae_options["toy_scale"] == 1.0  # its default
    with pytest.raises(SAELensError, match="toy_scale must be positive"):
        make_runner_config(architecture=NAME, toy_scale=-1.0)
    with pytest.raises(SAELensError, match="did you mean 'toy_scale'"):
        make_runner_config(architecture=NAME, toy_scal=1.0)


def test_yaml_carries_the_new_option(toy: type[SparseAutoencoder], tmp_path: Path) -> None:
    cfg = toy_cfg()
    cfg.to_yaml(tmp_path / "cfg.yaml")
    assert "toy_scale: 2.5" in (tmp_path / "cfg.yaml").read_text()
    assert type(cfg).from_yaml(tmp_path / "cfg.yaml") == cfg


def test_the_cli_lists_and_parses_the_new_flag(
    toy: type[SparseAutoencoder], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--toy_scale" in help_text
    assert f"SAE options: {NAME}" in help_text
    assert "Factor applied to every latent" in help_text
    args = parser.parse_args(["train", "--architecture", NAME, "--toy_scale", "3", "--d_in", "8"])
    cfg = config_from_args(args)
    assert cfg.architecture == NAME and cfg.sae_options["toy_scale"] == 3.0
    assert isinstance(cfg.sae_options["toy_scale"], float)


def test_the_trainer_trains_it(toy: type[SparseAutoencoder]) -> None:
    cfg = toy_cfg(train_batch_size=32, total_training_tokens=64, b_dec_init_method="mean")
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg)
    assert type(sae) is toy and sae.architecture_name == NAME
    x = torch.randn(32, 8)
    with torch.no_grad():
        expected = torch.relu(sae.encode_pre(x)) * 2.5
        torch.testing.assert_close(sae.encode(x), expected)
    out = sae.training_forward_pass(x)
    assert set(out.losses) == {"mse", "toy"}
    assert out.loss.item() == pytest.approx(out.losses["mse"].item() + out.losses["toy"].item())
    trainer = SAETrainer(cfg, sae, show_progress=False)
    before = sae.W_enc.detach().clone()
    trainer.fit([x, torch.randn(32, 8)])
    assert trainer.n_steps == 2 and not torch.equal(sae.W_enc.detach(), before)
    with trainer.allocator_policy():
        metrics = trainer.train_step(torch.randn(32, 8))
    assert "losses/toy" in metrics and metrics["loss"] > 0


def test_a_saved_folder_loads_back_as_it(toy: type[SparseAutoencoder], tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(toy_cfg())
    folder = sae.save_model(tmp_path / "toy")
    saved = json.loads((folder / "cfg.json").read_text())
    assert saved["architecture"] == NAME and saved["toy_scale"] == 2.5
    loaded = SparseAutoencoder.load_from_disk(folder)
    assert type(loaded) is toy and loaded.cfg == sae.cfg
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))


def test_it_is_gone_after_the_tests_that_registered_it() -> None:
    assert NAME not in registered_architectures()
    with pytest.raises(SAELensError, match=NAME):
        make_runner_config(architecture=NAME)
