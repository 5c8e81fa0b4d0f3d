"""SAE folders written by the real SAELens 6.x load here and give the reference's outputs.

The folders under tests/data/saelens6/ were written by `sae-lens` 6.54.12 itself (see the README
there and generate.py, which runs under that package, not ours): one per training architecture,
saved with the reference's `save_inference_model`, plus `expected.safetensors` holding a fixed input
`x` and the reference's `encode(x)`, `decode(encode(x))` and `forward(x)` after loading the folder
with the reference's `SAE.load_from_disk`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_lens.saes import GatedSAE, JumpReLUSAE, SparseAutoencoder, StandardSAE, TopKSAE

DATA = Path(__file__).parents[1] / "data" / "saelens6"

# Training architecture -> (architecture the reference writes into cfg.json, our class that loads it).
# SAELens saves the BatchTopK family for inference as JumpReLU with a per-latent threshold.
SAVED_AS: dict[str, tuple[str, type[SparseAutoencoder]]] = {
    "standard": ("standard", StandardSAE),
    "topk": ("topk", TopKSAE),
    "batchtopk": ("jumprelu", JumpReLUSAE),
    "jumprelu": ("jumprelu", JumpReLUSAE),
    "gated": ("gated", GatedSAE),
    "matryoshka_batchtopk": ("jumprelu", JumpReLUSAE),
}
ARCHITECTURES = list(SAVED_AS)
BATCHTOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")


def folder(architecture: str) -> Path:
    return DATA / architecture


def expected(architecture: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder(architecture) / "expected.safetensors"))


def expected_facts(architecture: str) -> dict[str, str]:
    """What generate.py recorded about the reference run (versions, saved architecture, class)."""
    with safe_open(str(folder(architecture) / "expected.safetensors"), framework="pt") as f:
        return dict(f.metadata())


def raw_cfg(architecture: str) -> dict[str, Any]:
    return json.loads((folder(architecture) / "cfg.json").read_text())


def outputs(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        latents = sae.encode(x)
        return {"encode": latents, "decode": sae.decode(latents), "forward": sae(x)}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fixture_is_what_the_reference_wrote(architecture: str) -> None:
    """Guards the data itself: the reference's own files, its version, and what it saved each as."""
    files = sorted(p.name for p in folder(architecture).iterdir())
    assert files == ["cfg.json", "expected.safetensors", "sae_weights.safetensors"]
    facts = expected_facts(architecture)
    saved_as, _ = SAVED_AS[architecture]
    assert facts["sae_lens_version"].startswith("6.")
    assert facts["training_architecture"] == architecture
    assert facts["saved_architecture"] == saved_as
    cfg = raw_cfg(architecture)
    assert cfg["architecture"] == saved_as
    assert cfg["metadata"]["training_architecture"] == architecture
    assert cfg["metadata"]["sae_lens_version"] == facts["sae_lens_version"]
    x = expected(architecture)["x"]
    assert x.shape == (10, 8) and x.dtype == torch.float32


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_reference_folder_loads_as_the_saved_architecture(architecture: str) -> None:
    sae = SparseAutoencoder.load_from_disk(folder(architecture))
    saved_as, our_class = SAVED_AS[architecture]
    assert type(sae) is our_class
    assert sae.cfg.architecture == saved_as
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (8, 32)
    assert sae.cfg.dtype == "float32" and sae.W_enc.dtype == torch.float32
    assert sae.cfg.metadata["hook_name"] == "blocks.0.hook_resid_post"
    assert sae.cfg.metadata["model_name"] == "tiny-reference-model"
    assert sae.cfg.metadata["training_architecture"] == architecture
    if architecture == "topk":
        assert sae.cfg.k == 4


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_weights_match_the_reference_file(architecture: str) -> None:
    sae = SparseAutoencoder.load_from_disk(folder(architecture))
    on_disk = load_file(str(folder(architecture) / "sae_weights.safetensors"))
    ours = sae.state_dict()
    assert set(ours) == set(on_disk)
    for name, tensor in on_disk.items():
        if raw_cfg(architecture).get("rescale_acts_by_decoder_norm"):
            # The loader folds the decoder norms into the encoder; the reference's own save already
            # made them 1 up to rounding, so the weights move by a few ulps at most.
            torch.testing.assert_close(ours[name], tensor, msg=name)
        else:
            assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_outputs_match_the_reference(architecture: str) -> None:
    sae = SparseAutoencoder.load_from_disk(folder(architecture))
    reference = expected(architecture)
    ours = outputs(sae, reference["x"])
    # The same latents fire: a threshold, gate or top-k decision that differed would show here
    # even where the differing activation is small.
    assert torch.equal(ours["encode"] > 0, reference["encode"] > 0)
    for name in ("encode", "decode", "forward"):
        torch.testing.assert_close(ours[name], reference[name], msg=name)
    with torch.no_grad():
        # decode alone, on exactly the reference's latents.
        torch.testing.assert_close(sae.decode(reference["encode"]), reference["decode"])
    # Sanity on the fixture: the outputs are not degenerate.
    assert (reference["encode"] > 0).any() and not torch.equal(reference["forward"], reference["x"])


@pytest.mark.parametrize("architecture", BATCHTOPK_FAMILY)
def test_batchtopk_threshold_is_the_trained_scalar_and_matters(architecture: str) -> None:
    """SAELens turns its single EMA threshold into a per-latent JumpReLU threshold; it must be
    carried over, and it must actually cut latents on this input (otherwise ReLU would pass too)."""
    sae = SparseAutoencoder.load_from_disk(folder(architecture))
    assert isinstance(sae, JumpReLUSAE)
    threshold = sae.threshold.detach()
    assert threshold.shape == (32,)
    assert torch.equal(threshold, threshold[:1].expand(32)) and threshold[0] > 0
    reference = expected(architecture)
    with torch.no_grad():
        pre = sae.encode_pre(reference["x"])
    assert ((pre > 0) & (reference["encode"] == 0)).any()


def test_jumprelu_thresholds_are_per_latent() -> None:
    sae = SparseAutoencoder.load_from_disk(folder("jumprelu"))
    assert isinstance(sae, JumpReLUSAE)
    threshold = sae.threshold.detach()
    assert threshold.unique().numel() == 32 and (threshold > 0).all()
    norms = sae.W_dec.detach().norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms))


def test_topk_rescale_flag_with_non_unit_decoder_rows(tmp_path: Path) -> None:
    """The reference's save leaves TopK decoder rows at unit norm, so the folder above only shows
    that the flag is accepted. Here the rows are given norms 0.5-2 under the same cfg.json, and the
    result is checked against SAELens' TopK inference rule with the flag set: topk and ReLU of
    pre * ‖W_dec_i‖, decoded as (acts / ‖W_dec_i‖) @ W_dec + b_dec."""
    cfg = raw_cfg("topk")
    assert cfg["rescale_acts_by_decoder_norm"] is True
    weights = load_file(str(folder("topk") / "sae_weights.safetensors"))
    row_scale = 0.5 + 1.5 * torch.rand(32, 1, generator=torch.Generator().manual_seed(7))
    weights["W_dec"] = weights["W_dec"] * row_scale
    scaled = tmp_path / "topk_scaled"
    scaled.mkdir()
    (scaled / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(scaled / "sae_weights.safetensors"))

    w = {name: t.double() for name, t in weights.items()}
    x = expected("topk")["x"]
    norms = w["W_dec"].norm(dim=-1)
    pre = ((x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    top = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    recon = (acts / norms) @ w["W_dec"] + w["b_dec"]

    sae = SparseAutoencoder.load_from_disk(scaled)
    ours = outputs(sae, x)
    assert torch.equal(ours["encode"] > 0, acts > 0)
    torch.testing.assert_close(ours["encode"].double(), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["forward"].double(), recon, rtol=1e-5, atol=1e-5)
    unit = sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(unit, torch.ones_like(unit))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_our_save_of_a_reference_folder_reloads_identically(architecture: str, tmp_path: Path) -> None:
    sae = SparseAutoencoder.load_from_disk(folder(architecture))
    resaved = sae.save_model(tmp_path / architecture)
    reloaded = SparseAutoencoder.load_from_disk(resaved)
    assert type(reloaded) is type(sae)
    assert reloaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    x = expected(architecture)["x"]
    before, after = outputs(sae, x), outputs(reloaded, x)
    for name in before:
        assert torch.equal(after[name], before[name]), name
