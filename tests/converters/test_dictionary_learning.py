"""The dictionary_learning converter against the library's own outputs (tests/data/dictionary_learning,
written by dictionary-learning 0.1.0): every dictionary class, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens.converters.dictionary_learning import hook_for_submodule
from sae_lens.errors import SAELensError
from sae_lens.saes import GatedSAE, JumpReLUSAE, SparseAutoencoder, StandardSAE, TopKSAE

DATA = Path(__file__).resolve().parents[1] / "data" / "dictionary_learning"

CLASSES = {
    "standard": (StandardSAE, "AutoEncoder"),
    "standard_april_update": (StandardSAE, "AutoEncoder"),
    "autoencoder_new": (StandardSAE, "AutoEncoderNew"),
    "gated": (GatedSAE, "GatedAutoEncoder"),
    "topk": (TopKSAE, "AutoEncoderTopK"),
    "topk_normalized": (TopKSAE, "AutoEncoderTopK"),
    "batch_topk": (JumpReLUSAE, "BatchTopKSAE"),
    "matryoshka_batch_topk": (JumpReLUSAE, "MatryoshkaBatchTopKSAE"),
    "jumprelu": (JumpReLUSAE, "JumpReluAutoEncoder"),
}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_class_matches_the_library(name: str) -> None:
    expected = load_file(DATA / name / "expected.safetensors")
    sae = SparseAutoencoder.load_from_disk(DATA / name)
    architecture, library_class = CLASSES[name]
    assert type(sae) is architecture
    assert sae.cfg.metadata["dictionary_learning_class"] == library_class
    assert sae.cfg.metadata["model_name"] == "EleutherAI/pythia-70m-deduped"
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    with torch.no_grad():
        latents = sae.encode(expected["x"])
        torch.testing.assert_close(latents, expected["encode"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(expected["encode"]), expected["decode"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(expected["x"]), expected["forward"], rtol=1e-4, atol=1e-5)
    assert latents.abs().sum() > 0  # the fixed input fires latents: the comparison is not of zeros


def test_april_update_decoder_norms_are_folded_as_the_library_loads_them() -> None:
    # The library's default load divides each decoder column by its norm and scales the encoder:
    # its encode is the as-saved encode times the norms; the reconstruction is unchanged.
    expected = load_file(DATA / "standard_april_update" / "expected.safetensors")
    raw = torch.load(DATA / "standard_april_update" / "ae.pt", weights_only=True)
    norms = raw["decoder.weight"].norm(dim=0)
    assert norms.min() < 0.9  # really not unit norm
    sae = SparseAutoencoder.load_from_disk(DATA / "standard_april_update")
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        unnormalized = sae.encode(expected["x"]) / norms
    torch.testing.assert_close(unnormalized, expected["encode_unnormalized"], rtol=1e-4, atol=1e-5)


def test_negative_jumprelu_thresholds_are_exact_as_zero() -> None:
    # The library computes relu(pre * (pre > t)), pre = x @ W_enc + b_enc (dictionary.py:299-309);
    # with t < 0 that is relu(pre), which is ours with t = 0. Inputs must hit the region that tells
    # the two readings apart, t < pre < 0, on latents with t < 0.
    raw = torch.load(DATA / "jumprelu" / "ae.pt", weights_only=True)
    negative = raw["threshold"] < 0
    assert negative.any()
    x = 3 * torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    pre = x @ raw["W_enc"] + raw["b_enc"]
    between = (pre > raw["threshold"]) & (pre < 0) & negative
    assert between.sum() > 20
    library = torch.relu(pre * (pre > raw["threshold"]))
    sae = SparseAutoencoder.load_from_disk(DATA / "jumprelu")
    assert (sae.threshold[negative] == 0).all()
    assert torch.equal(sae.threshold[~negative], raw["threshold"][~negative])
    with torch.no_grad():
        latents = sae.encode(x)
    torch.testing.assert_close(latents, library, rtol=1e-5, atol=1e-5)
    # Keeping the negative thresholds (without the library's ReLU) would pass negative values.
    assert (pre * (pre > raw["threshold"]))[between].min() < 0


def test_batchtopk_family_infer_with_the_scalar_threshold() -> None:
    for name in ("batch_topk", "matryoshka_batch_topk"):
        raw = torch.load(DATA / name / "ae.pt", weights_only=True)
        sae = SparseAutoencoder.load_from_disk(DATA / name)
        assert raw["threshold"].ndim == 0 and raw["threshold"] > 0
        assert torch.equal(sae.threshold, raw["threshold"].expand(64))
        assert sae.cfg.metadata["training_k"] == int(raw["k"]) == 4
    meta = SparseAutoencoder.load_from_disk(DATA / "matryoshka_batch_topk").cfg.metadata
    assert meta["matryoshka_group_sizes"] == [16, 16, 32]


def test_autoencoder_new_is_told_by_its_keys_not_dict_class() -> None:
    config = json.loads((DATA / "autoencoder_new" / "config.json").read_text())
    assert config["trainer"]["dict_class"] == "AutoEncoder"  # what the trainer wrote
    sae = SparseAutoencoder.load_from_disk(DATA / "autoencoder_new")
    assert not sae.cfg.apply_b_dec_to_input


def test_unknown_tensors_and_pickled_objects_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    shutil.copytree(DATA / "standard", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save(state | {"extra": torch.zeros(1)}, folder / "ae.pt")
    with pytest.raises(SAELensError, match=r"keys: .*extra"):
        SparseAutoencoder.load_from_disk(folder)
    # Anything that needs unpickling beyond tensors is never run (weights_only=True).
    torch.save({"weights": state, "fn": shutil.rmtree}, folder / "ae.pt")
    with pytest.raises(SAELensError, match="weights_only"):
        SparseAutoencoder.load_from_disk(folder)


def test_config_without_a_trainer_section_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    shutil.copytree(DATA / "topk", folder)
    (folder / "config.json").write_text(json.dumps({"buffer": {}}))
    with pytest.raises(SAELensError, match="trainer"):
        SparseAutoencoder.load_from_disk(folder)


def test_submodule_names_map_to_hooks() -> None:
    assert hook_for_submodule("resid_post_layer_7", 7) == "blocks.7.hook_resid_post"
    assert hook_for_submodule("my_attn_probe", 7) is None
