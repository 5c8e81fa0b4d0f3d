"""Gemma Scope 2 folders (`config.json` + `params.safetensors`), built in the published layout, with
expected values computed by hand from Gemma Scope 2's reference formula:
`f = (pre > threshold) * relu(pre)`, `out = f @ w_dec + b_dec + x @ affine_skip_connection`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_lens.converters.gemma_scope_2 import hf_module_hook
from sae_lens.errors import SAELensError
from sae_lens.saes import JumpReLUSAE, SparseAutoencoder

D_IN, D_SAE = 6, 10


def write_folder(
    folder: Path, config: dict, affine: bool = False, d_out: int = D_IN
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = {
        "w_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
        "w_dec": torch.randn(D_SAE, d_out, generator=g),
        "b_dec": torch.randn(d_out, generator=g),
        "threshold": torch.rand(D_SAE, generator=g) * 0.5,
    }
    if affine:
        params["affine_skip_connection"] = torch.randn(D_IN, d_out, generator=g)
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return params


def by_hand(p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = {name: value.double() for name, value in p.items()}
    pre = x.double() @ p["w_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * torch.relu(pre)
    out = acts @ p["w_dec"] + p["b_dec"]
    if "affine_skip_connection" in p:
        out = out + x.double() @ p["affine_skip_connection"]
    return acts, out


def test_residual_sae(tmp_path: Path) -> None:
    config = {
        "hf_hook_point_in": "model.layers.12.output",
        "width": D_SAE,
        "model_name": "gemma-3-1b-pt",
        "architecture": "jump_relu",
        "l0": 3,
        "affine_connection": False,
        "type": "sae",
    }
    params = write_folder(tmp_path / "resid_post" / "layer_12_width_16k_l0_small", config)
    sae = SparseAutoencoder.load_from_disk(tmp_path / "resid_post" / "layer_12_width_16k_l0_small")
    assert isinstance(sae, JumpReLUSAE) and not sae.cfg.apply_b_dec_to_input and not sae.cfg.skip_connection
    meta = sae.cfg.metadata
    assert meta["hook_name"] == "blocks.12.hook_resid_post" and meta["model_name"] == "google/gemma-3-1b-pt"
    assert meta["hf_hook_name"] == "model.layers.12.output"
    x = 2 * torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    acts, out = by_hand(params, x)
    assert (acts > 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).double(), out, rtol=1e-5, atol=1e-5)


def test_affine_transcoder_has_a_skip_path(tmp_path: Path) -> None:
    config = {
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output",
        "width": D_SAE,
        "model_name": "google/gemma-3-4b-it",
        "architecture": "jump_relu",
        "affine_connection": True,
        "type": "transcoder",
    }
    folder = tmp_path / "transcoder_all" / "layer_5_width_16k_l0_big_affine"
    params = write_folder(folder, config, affine=True, d_out=4)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert sae.cfg.skip_connection and sae.cfg.d_out == 4 and sae.cfg.is_transcoder
    assert (sae.cfg.metadata["hook_name"], sae.cfg.metadata["hook_name_out"]) == (
        "blocks.5.ln2.hook_normalized",
        "blocks.5.hook_mlp_out",
    )
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(sae(x).double(), by_hand(params, x)[1], rtol=1e-5, atol=1e-5)


def test_unknown_hook_falls_back_to_the_folder_and_crosscoders_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mlp_out_all" / "layer_2_width_16k_l0_small"
    write_folder(folder, {"architecture": "jump_relu"})
    assert SparseAutoencoder.load_from_disk(folder).cfg.metadata["hook_name"] == "blocks.2.hook_mlp_out"
    crosscoder = tmp_path / "crosscoder" / "layer_7_13_width_262k"
    crosscoder.mkdir(parents=True)
    (crosscoder / "config.json").write_text(json.dumps({"architecture": "jump_relu"}))
    save_file(
        {
            "w_enc": torch.zeros(2, 4, 8),
            "b_enc": torch.zeros(8),
            "w_dec": torch.zeros(8, 2, 4),
            "b_dec": torch.zeros(2, 4),
            "threshold": torch.zeros(8),
        },
        str(crosscoder / "params.safetensors"),
    )
    with pytest.raises(SAELensError, match="multi-layer"):
        SparseAutoencoder.load_from_disk(crosscoder)


def test_hf_module_names_map_to_hooks() -> None:
    assert hf_module_hook("model.layers.3.output") == "blocks.3.hook_resid_post"
    assert hf_module_hook("model.language_model.layers.3.output") == "blocks.3.hook_resid_post"
    assert hf_module_hook("model.layers.3.self_attn.o_proj.input") == "blocks.3.attn.hook_z"
    assert hf_module_hook("model.layers.3.mlp.down_proj.output") is None
