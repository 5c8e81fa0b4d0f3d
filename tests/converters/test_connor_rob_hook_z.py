"""Hook-z attention SAEs (`<name>.pt` + `<name>_cfg.json`, several per folder), built in the
published layout, against the standard ReLU SAE computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import SparseAutoencoder, StandardSAE

D_IN, D_SAE = 12, 24  # 3 heads x d_head 4, concatenated


def write_layer(folder: Path, layer: int) -> tuple[str, dict[str, torch.Tensor]]:
    name = f"gpt2-small_L{layer}_Hcat_z_lr1.20e-03_l11.80e+00_ds{D_SAE}_bs4096_v9"
    g = torch.Generator().manual_seed(layer)
    state = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"{name}.pt")
    cfg = {
        "act_size": D_IN,
        "dict_size": D_SAE,
        "act_name": f"blocks.{layer}.attn.hook_z",
        "layer": layer,
        "seq_len": 128,
        "model_name": "gpt2-small",
        "site": "z",
        "concat_heads": True,
        "l1_coeff": 1.8,
    }
    (folder / f"{name}_cfg.json").write_text(json.dumps(cfg))
    return name, state


def test_each_file_is_an_sae_of_the_folder(tmp_path: Path) -> None:
    name0, state0 = write_layer(tmp_path, 0)
    name1, _ = write_layer(tmp_path, 1)
    with pytest.raises(SAELensError, match="holds 2 SAEs"):
        SparseAutoencoder.load_from_disk(tmp_path)
    for sae_id in (f"{name0}.pt", name0):
        sae = SparseAutoencoder.load_from_disk(tmp_path, sae_id=sae_id)
        assert isinstance(sae, StandardSAE)
        assert sae.cfg.metadata == {
            "hook_name": "blocks.0.attn.hook_z",
            "hook_layer": 0,
            "model_name": "gpt2",
            "context_size": 128,
        }
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(5))
    acts = torch.relu((x - state0["b_dec"]) @ state0["W_enc"] + state0["b_enc"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts)
        torch.testing.assert_close(sae(x), acts @ state0["W_dec"] + state0["b_dec"], rtol=1e-5, atol=1e-5)
    assert SparseAutoencoder.load_from_disk(tmp_path, sae_id=name1).cfg.metadata["hook_layer"] == 1


def test_a_size_that_disagrees_with_the_config_is_refused(tmp_path: Path) -> None:
    name, _ = write_layer(tmp_path, 2)
    cfg = json.loads((tmp_path / f"{name}_cfg.json").read_text())
    (tmp_path / f"{name}_cfg.json").write_text(json.dumps(cfg | {"dict_size": 48}))
    with pytest.raises(SAELensError, match="dict_size 48"):
        SparseAutoencoder.load_from_disk(tmp_path)
