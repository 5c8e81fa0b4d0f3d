"""Gemma Scope `params.npz` SAEs and transcoders, built in the published layout in tmp_path, with
expected values computed by hand from the Gemma Scope tutorial's formula:
`f = (pre > threshold) * relu(pre)`, `pre = x @ W_enc + b_enc`, `x_hat = f @ W_dec + b_dec`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import JumpReLUSAE, SparseAutoencoder

D_IN, D_SAE = 6, 12


def write_params(folder: Path, d_out: int = D_IN, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
        "b_enc": rng.normal(size=D_SAE).astype(np.float32) * 0.3,
        "W_dec": rng.normal(size=(D_SAE, d_out)).astype(np.float32),
        "b_dec": rng.normal(size=d_out).astype(np.float32),
        "threshold": np.abs(rng.normal(size=D_SAE)).astype(np.float32) * 0.5,
    }
    params["threshold"][:2] = [-0.25, -0.5]  # a negative threshold: exact as 0 under the ReLU
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return params


def by_hand(params: dict[str, np.ndarray], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = {name: torch.from_numpy(value).double() for name, value in params.items()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * torch.relu(pre)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_residual_sae_matches_the_formula_and_reads_its_hook_off_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_5"
    params = write_params(folder)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, JumpReLUSAE) and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata["model_name"] == "google/gemma-2-2b"
    x = 2 * torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    acts, out = by_hand(params, x)
    assert (acts > 0).any() and (acts == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).double(), out, rtol=1e-5, atol=1e-5)


def test_transcoder_and_attention_paths(tmp_path: Path) -> None:
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_7" / "width_16k" / "average_l0_9"
    params = write_params(folder, d_out=4)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert sae.cfg.d_out == 4 and sae.cfg.is_transcoder
    assert (sae.cfg.metadata["hook_name"], sae.cfg.metadata["hook_name_out"]) == (
        "blocks.7.ln2.hook_normalized",
        "blocks.7.hook_mlp_out",
    )
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(sae(x).double(), by_hand(params, x)[1], rtol=1e-5, atol=1e-5)
    att = tmp_path / "gemma-scope-9b-it-att" / "layer_1" / "width_16k" / "average_l0_3"
    write_params(att)
    meta = SparseAutoencoder.load_from_disk(att).cfg.metadata
    assert meta["hook_name"] == "blocks.1.attn.hook_z" and meta["model_name"] == "google/gemma-2-9b-it"


def test_a_folder_without_hints_loads_with_no_hook(tmp_path: Path) -> None:
    write_params(tmp_path / "sae")
    assert "hook_name" not in SparseAutoencoder.load_from_disk(tmp_path / "sae").cfg.metadata


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    folder.mkdir()
    np.savez(folder / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAELensError, match="npz"):
        SparseAutoencoder.load_from_disk(folder)
