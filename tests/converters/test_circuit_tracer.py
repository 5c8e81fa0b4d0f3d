"""circuit-tracer transcoder sets (`layer_N.safetensors` + `config.yaml`), built in the published
layout, against `SingleLayerTranscoder`'s formula computed by hand:
`f = act(x @ W_enc.T + b_enc)`, `out = f @ W_dec + b_dec + x @ W_skip.T`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sae_lens.errors import SAELensError
from sae_lens.saes import JumpReLUSAE, SparseAutoencoder, StandardSAE

D, D_SAE = 6, 10


def write_layer(
    folder: Path, layer: int, threshold: torch.Tensor | None = None, skip: bool = False
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(layer)
    state = {
        "W_enc": torch.randn(D_SAE, D, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
        "W_dec": torch.randn(D_SAE, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    if threshold is not None:
        state["activation_function.threshold"] = threshold
    if skip:
        state["W_skip"] = torch.randn(D, D, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / f"layer_{layer}.safetensors"))
    return state


def write_config(folder: Path, **extra: object) -> None:
    config = {
        "model_name": "meta-llama/Llama-3.2-1B",
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "transcoders": [f"layer_{i}.safetensors" for i in range(2)],
        **extra,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_relu_and_jumprelu_skip_transcoders(tmp_path: Path) -> None:
    relu = write_layer(tmp_path, 0)
    jump = write_layer(tmp_path, 1, threshold=torch.full((D_SAE,), 0.3), skip=True)
    write_config(tmp_path)
    with pytest.raises(SAELensError, match="holds 2 SAEs"):
        SparseAutoencoder.load_from_disk(tmp_path)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(9))
    sae = SparseAutoencoder.load_from_disk(tmp_path, sae_id="layer_0")
    assert isinstance(sae, StandardSAE) and not sae.cfg.apply_b_dec_to_input and sae.cfg.is_transcoder
    assert (sae.cfg.metadata["hook_name"], sae.cfg.metadata["hook_name_out"]) == (
        "blocks.0.ln2.hook_normalized",
        "blocks.0.hook_mlp_out",
    )
    assert sae.cfg.metadata["model_name"] == "meta-llama/Llama-3.2-1B"
    acts = torch.relu(x @ relu["W_enc"].T + relu["b_enc"])
    with torch.no_grad():
        torch.testing.assert_close(sae(x), acts @ relu["W_dec"] + relu["b_dec"], rtol=1e-5, atol=1e-5)
    sae = SparseAutoencoder.load_from_disk(tmp_path, sae_id="layer_1")
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.skip_connection
    pre = x @ jump["W_enc"].T + jump["b_enc"]
    acts = pre * (pre > 0.3)
    expected = acts @ jump["W_dec"] + jump["b_dec"] + x @ jump["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path: Path) -> None:
    # pre * (pre > t) with t < 0 passes negative pre-activations: no architecture here does that.
    write_layer(tmp_path / "neg", 0, threshold=torch.full((D_SAE,), -0.1))
    with pytest.raises(SAELensError, match="negative"):
        SparseAutoencoder.load_from_disk(tmp_path / "neg")
    write_layer(tmp_path / "escape", 0)
    write_config(tmp_path / "escape", transcoders=["../../elsewhere/layer_0.safetensors"])
    with pytest.raises(SAELensError, match="not a relative path"):
        SparseAutoencoder.load_from_disk(tmp_path / "escape")
    state = write_layer(tmp_path / "topk", 0)
    save_file(state | {"k": torch.tensor(4)}, str(tmp_path / "topk" / "layer_0.safetensors"))
    with pytest.raises(SAELensError, match="TopK"):
        SparseAutoencoder.load_from_disk(tmp_path / "topk")
