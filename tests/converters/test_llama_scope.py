"""Llama Scope folders (`hyperparams.json` + `checkpoints/final.safetensors`), built in the published
layout, against Language-Model-SAEs' own inference steps done literally in the test: fold the
dataset-wise normalisation into the parameters, make the decoder unit-norm (norms into the
encoder), then JumpReLU `z * (z > jump_relu_threshold)` on raw activations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_lens.errors import SAELensError
from sae_lens.saes import JumpReLUSAE, SparseAutoencoder, TopKSAE

D, D_SAE, THRESHOLD = 8, 16, 0.4


def write_folder(
    root: Path, norm_in: float, norm_out: float, **hyper: object
) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = root / "Llama3_1-8B-Base-L3R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.5,
        # Decoder columns of norms 0.3-3: the unit-norm step must matter.
        "decoder.weight": torch.randn(D, D_SAE, generator=g) * torch.linspace(0.3, 3.0, D_SAE),
        "decoder.bias": torch.randn(D, generator=g),
    }
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    hyperparams = {
        "d_model": D,
        "d_sae": D_SAE,
        "hook_point_in": "blocks.3.hook_resid_post",
        "hook_point_out": "blocks.3.hook_resid_post",
        "act_fn": "jumprelu",
        "jump_relu_threshold": THRESHOLD,
        "top_k": 4,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
        "sparsity_include_decoder_norm": True,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        **hyper,
    }
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    return folder, tensors


def library_inference(t: dict[str, torch.Tensor], x: torch.Tensor, norm_in: float, norm_out: float):
    """Language-Model-SAEs' inference state, step by step, in float64."""
    E, b_E = t["encoder.weight"].double(), t["encoder.bias"].double()
    Dm, b_D = t["decoder.weight"].double(), t["decoder.bias"].double()
    s_in, s_out = math.sqrt(D) / norm_in, math.sqrt(D) / norm_out
    # standardize_parameters_of_dataset_norm
    b_E, b_D, Dm = b_E / s_in, b_D / s_out, Dm * s_in / s_out
    # transform_to_unit_decoder_norm (the decoder norms move into the encoder)
    n = Dm.norm(dim=0)
    E, b_E, Dm = E * n[:, None], b_E * n, Dm / n
    pre = x.double() @ E.T + b_E
    acts = pre * (pre > THRESHOLD)
    return acts, acts @ Dm.T + b_D


@pytest.mark.parametrize(("norm_in", "norm_out"), [(1.7, 1.7), (1.7, 0.6)])
def test_matches_the_library_inference_steps(tmp_path: Path, norm_in: float, norm_out: float) -> None:
    folder, tensors = write_folder(tmp_path, norm_in, norm_out)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, JumpReLUSAE) and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata["model_name"] == "meta-llama/Llama-3.1-8B"
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), rtol=1e-5, atol=1e-5)
    x = 0.7 * torch.randn(256, D, generator=torch.Generator().manual_seed(1))
    acts, out = library_inference(tensors, x, norm_in, norm_out)
    assert (acts > 0).float().mean().item() > 0.05 and (acts == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).double(), out, rtol=1e-5, atol=1e-5)
    # The same reconstruction as the training-time model on normalised inputs, de-normalised:
    # x_hat = (f_train @ W_D + b_D) / s_out with f_train the training pre-activations where firing.
    s_in, s_out = math.sqrt(D) / norm_in, math.sqrt(D) / norm_out
    pre_train = (x.double() * s_in) @ tensors["encoder.weight"].double().T + tensors["encoder.bias"].double()
    train_out = (
        (pre_train * (acts > 0)) @ tensors["decoder.weight"].double().T + tensors["decoder.bias"].double()
    ) / s_out
    torch.testing.assert_close(out, train_out, rtol=1e-9, atol=1e-9)


def test_topk_and_refusals(tmp_path: Path) -> None:
    folder, _ = write_folder(tmp_path / "a", 1.0, 1.0, act_fn="topk", jump_relu_threshold=0)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 4
    folder, _ = write_folder(tmp_path / "b", 1.0, 1.0, norm_activation="token-wise")
    with pytest.raises(SAELensError, match="token-wise"):
        SparseAutoencoder.load_from_disk(folder)
    folder, _ = write_folder(tmp_path / "c", 1.0, 1.0, use_glu_encoder=True)
    with pytest.raises(SAELensError, match="GLU"):
        SparseAutoencoder.load_from_disk(folder)
    folder, _ = write_folder(tmp_path / "d", 1.0, 1.0, d_sae=32)
    with pytest.raises(SAELensError, match="d_sae 32"):
        SparseAutoencoder.load_from_disk(folder)


def test_transcoder_hooks(tmp_path: Path) -> None:
    folder, _ = write_folder(
        tmp_path,
        64.0,
        3.4,
        hook_point_in="blocks.8.ln2.hook_normalized",
        hook_point_out="blocks.8.hook_mlp_out",
    )
    sae = SparseAutoencoder.load_from_disk(folder)
    assert sae.cfg.is_transcoder and sae.cfg.metadata["hook_name_out"] == "blocks.8.hook_mlp_out"
    assert sae.cfg.metadata["dataset_norm_scaling_factor_in"] == pytest.approx(math.sqrt(D) / 64.0)
