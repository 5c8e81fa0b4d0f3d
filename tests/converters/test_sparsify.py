"""The sparsify converter against sparsify's own outputs (tests/data/sparsify, written by eai-sparsify
1.3.3): single coders, transcoders (with skip), run folders, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens.converters.sparsify import hookpoint_hooks
from sae_lens.errors import SAELensError
from sae_lens.sae_files import read_sae_folder
from sae_lens.saes import SparseAutoencoder, TopKSAE

DATA = Path(__file__).resolve().parents[1] / "data" / "sparsify"


def check_against_expected(
    sae: SparseAutoencoder, expected: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    """Our encode / decode / forward against the library's (the top-k is unsorted: compare dense codes)."""
    x = expected[f"{prefix}x"]
    with torch.no_grad():
        latents = sae.encode(x)
        torch.testing.assert_close(latents, expected[f"{prefix}latents_dense"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(latents), expected[f"{prefix}decode"], rtol=1e-5, atol=1e-5)
    assert ((latents != 0).sum(-1) <= sae.cfg.k).all()


@pytest.mark.parametrize("name", ["topk", "expansion_factor", "transcoder", "transcoder_skip", "multi_topk"])
def test_single_coders_match_sparsify(name: str) -> None:
    expected = load_file(DATA / name / "expected.safetensors")
    # The fixture folders are laid out like a hub repo: one hookpoint folder inside.
    sae = SparseAutoencoder.load_from_disk(DATA / name)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 4 and sae.cfg.d_sae == 64 and sae.cfg.d_in == 16
    check_against_expected(sae, expected)
    with torch.no_grad():
        out = sae(expected["x"])
    if name == "multi_topk":
        # sparsify's forward returns its 4k decode there; inference (encode/decode, k) is unchanged.
        assert not torch.allclose(expected["forward_sae_out"], expected["decode"])
        torch.testing.assert_close(out, expected["decode"], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, expected["forward_sae_out"], rtol=1e-5, atol=1e-5)


def test_transcoders_read_one_hook_and_write_another() -> None:
    plain = SparseAutoencoder.load_from_disk(DATA / "transcoder")
    skip = SparseAutoencoder.load_from_disk(DATA / "transcoder_skip")
    for sae in (plain, skip):
        assert not sae.cfg.apply_b_dec_to_input and sae.cfg.d_out == 16 and sae.cfg.is_transcoder
        assert sae.cfg.metadata["hook_name"] == "blocks.3.ln2.hook_normalized"
        assert sae.cfg.metadata["hook_name_out"] == "blocks.3.hook_mlp_out"
    assert skip.cfg.skip_connection and not plain.cfg.skip_connection
    expected = load_file(DATA / "transcoder_skip" / "expected.safetensors")
    raw = load_file(DATA / "transcoder_skip" / "layers.3.mlp" / "sae.safetensors")
    # sparsify applies W_skip as x @ W_skip.T; ours is x @ W_skip.
    assert torch.equal(skip.W_skip, raw["W_skip"].T)
    with torch.no_grad():
        torch.testing.assert_close(skip.skip(expected["x"]), expected["skip_term"], rtol=1e-5, atol=1e-5)


def test_expansion_factor_gives_the_width_when_num_latents_is_zero() -> None:
    cfg = json.loads((DATA / "expansion_factor" / "layers.3" / "cfg.json").read_text())
    assert cfg["num_latents"] == 0 and cfg["expansion_factor"] == 4
    files = read_sae_folder(DATA / "expansion_factor" / "layers.3")
    assert files.config["d_sae"] == 16 * 4
    assert files.state_dict["W_enc"].shape == (16, 64)


@pytest.mark.parametrize(
    ("run", "hookpoints"), [("run_gpt2", ["h.0", "h.1.mlp"]), ("run_llama", ["layers.0", "layers.1.mlp"])]
)
def test_run_folders_pick_a_hookpoint_by_sae_id(run: str, hookpoints: list[str]) -> None:
    folder = DATA / run
    with pytest.raises(SAELensError, match="holds 2 SAEs; pass an sae_id") as info:
        SparseAutoencoder.load_from_disk(folder)
    assert all(hookpoint in str(info.value) for hookpoint in hookpoints)
    expected = load_file(folder / "expected.safetensors")
    config = json.loads((folder / "config.json").read_text())
    for hookpoint, hook in zip(
        hookpoints, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], strict=True
    ):
        sae = SparseAutoencoder.load_from_disk(folder, sae_id=hookpoint)
        check_against_expected(sae, expected, prefix=f"{hookpoint}/")
        meta = sae.cfg.metadata
        assert meta["hook_name"] == hook and meta["hf_hook_name"] == hookpoint
        # The run's config.json supplies the model and context the coder was trained on.
        assert meta["model_name"] == config["model"] and meta["context_size"] == config["ctx_len"] == 16
    with pytest.raises(SAELensError, match="closest"):
        SparseAutoencoder.load_from_disk(folder, sae_id=hookpoints[0] + "x")


def test_seed_subfolders_name_their_hookpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(DATA / "run_gpt2" / "h.0", run / "h.0" / "seed1")
    shutil.copy(DATA / "run_gpt2" / "config.json", run / "config.json")
    sae = SparseAutoencoder.load_from_disk(run, sae_id="h.0/seed1")
    assert sae.cfg.metadata["hook_name"] == "blocks.0.hook_resid_post"
    assert sae.cfg.metadata["context_size"] == 16


def test_groupmax_is_refused_clearly() -> None:
    with pytest.raises(SAELensError, match="groupmax") as info:
        SparseAutoencoder.load_from_disk(DATA / "groupmax")
    assert "\n" not in str(info.value)


def test_sparsify_beats_the_saelens_fallback_and_saelens_refuses_its_cfg() -> None:
    # Both folders hold a cfg.json; read as SAELens', this one would be a ReLU SAE of the wrong width.
    folder = DATA / "topk" / "layers.3"
    assert isinstance(SparseAutoencoder.load_from_disk(folder), TopKSAE)
    with pytest.raises(SAELensError, match="sparsify config"):
        read_sae_folder(folder, format_name="saelens")


def test_hookpoint_names_map_to_transformerlens_hooks() -> None:
    assert hookpoint_hooks("layers.5", False) == ("blocks.5.hook_resid_post", None)
    assert hookpoint_hooks("h.2.mlp", False) == ("blocks.2.hook_mlp_out", None)
    assert hookpoint_hooks("layers.0.attention", False) == ("blocks.0.hook_attn_out", None)
    assert hookpoint_hooks("layers.1.self_attn", False) == ("blocks.1.hook_attn_out", None)
    assert hookpoint_hooks("gpt_neox.layers.3", False) == ("blocks.3.hook_resid_post", None)
    assert hookpoint_hooks("embed_tokens", False) == ("hook_embed", None)
    assert hookpoint_hooks("layers.4.mlp", True) == ("blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out")
    assert hookpoint_hooks("layers.4", True) == ("blocks.4.hook_resid_pre", "blocks.4.hook_resid_post")
    assert hookpoint_hooks("lm_head", False) == (None, None)


def test_a_width_that_disagrees_with_cfg_json_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "layers.3"
    shutil.copytree(DATA / "topk" / "layers.3", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"num_latents": 32}))
    with pytest.raises(SAELensError, match="32 latents"):
        SparseAutoencoder.load_from_disk(folder)
