"""Loading what a user names (sae_lens/pretrained.py and the loading classmethods of the SAE):
local folders in any format, dtype and device over the files', no second copy of the weights,
SAE groups, the seed-era session loader and `load_model_and_sae` (on the tiny GPT-2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sae_lens.errors import SAELensError
from sae_lens.pretrained import (
    LMSparseAutoencoderSessionloader,
    SAEGroup,
    load_model_and_sae,
    load_sae,
    load_sae_group,
)
from sae_lens.sae_files import read_sae_folder
from sae_lens.saes import SparseAutoencoder, TopKSAE
from tests.conftest import make_runner_config, make_sae_config

DATA = Path(__file__).resolve().parent / "data"


def saelens_folder(folder: Path, d_in: int = 8, d_sae: int = 16, **cfg: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    save_file({"sparsity": torch.full((d_sae,), -2.0)}, str(folder / "sparsity.safetensors"))
    config = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "mps"}
    (folder / "cfg.json").write_text(
        json.dumps(config | {"metadata": {"hook_name": "blocks.0.hook_resid_post"}} | cfg)
    )
    return weights


@pytest.mark.parametrize(
    ("folder", "sae_id"),
    [
        (DATA / "sparsify" / "run_llama", "layers.1.mlp"),
        (DATA / "dictionary_learning" / "gated", None),
        (DATA / "saelens6" / "jumprelu", None),
    ],
)
def test_a_local_folder_in_any_format_loads_the_same_every_way(folder: Path, sae_id: str | None) -> None:
    by_disk = SparseAutoencoder.load_from_disk(folder, sae_id=sae_id)
    by_name = SparseAutoencoder.from_pretrained(str(folder), sae_id)
    via_load_sae = load_sae(str(folder), sae_id)
    for sae in (by_name, via_load_sae):
        assert type(sae) is type(by_disk) and sae.cfg == by_disk.cfg
        for name, tensor in by_disk.state_dict().items():
            assert torch.equal(sae.state_dict()[name], tensor), name


def test_dtype_and_device_win_over_the_files(tmp_path: Path) -> None:
    weights = saelens_folder(tmp_path / "sae")  # its cfg.json says device "mps"
    sae = SparseAutoencoder.from_pretrained(str(tmp_path / "sae"), dtype="bfloat16")
    assert sae.cfg.device == "cpu" and sae.device == torch.device("cpu") and sae.cfg.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in sae.parameters())
    assert torch.equal(sae.W_enc, weights["W_enc"].to(torch.bfloat16))
    jump = SparseAutoencoder.load_from_disk(DATA / "saelens6" / "jumprelu", dtype="float64")
    assert jump.W_enc.dtype == torch.float64 and jump.threshold.dtype == torch.float64


def test_loading_builds_no_second_copy_and_no_random_weights(tmp_path: Path) -> None:
    saelens_folder(tmp_path / "sae")
    files = read_sae_folder(tmp_path / "sae")
    tensors = {name: tensor.data_ptr() for name, tensor in files.state_dict.items()}
    sae = SparseAutoencoder.from_files(files, "sae")
    # The tensors read from the file are the parameters (the SAE was built on the meta device).
    assert {name: p.data_ptr() for name, p in sae.named_parameters()} == tensors
    assert files.state_dict == {}
    assert not any(t.is_meta for t in sae.state_dict().values())
    x = torch.randn(3, 8)
    assert torch.isfinite(sae(x)).all()


def test_with_cfg_and_sparsity(tmp_path: Path) -> None:
    saelens_folder(tmp_path / "sae")
    sae, cfg, sparsity = SparseAutoencoder.from_pretrained_with_cfg_and_sparsity(str(tmp_path / "sae"))
    assert (
        cfg == sae.cfg.to_dict()
        and cfg["d_sae"] == 16
        and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    )
    assert sparsity is not None and torch.equal(sparsity, torch.full((16,), -2.0))


def test_sae_ids_cannot_leave_the_folder(tmp_path: Path) -> None:
    saelens_folder(tmp_path / "inner" / "sae")
    with pytest.raises(SAELensError, match="not a relative path"):
        SparseAutoencoder.load_from_disk(tmp_path / "inner", sae_id="../inner/sae")


def test_sae_groups(tmp_path: Path) -> None:
    group = load_sae_group(DATA / "sparsify" / "run_gpt2")
    assert isinstance(group, SAEGroup) and group.names == ["h.0", "h.1.mlp"] and len(group) == 2
    assert all(isinstance(sae, TopKSAE) for sae in group)
    assert group["h.1.mlp"] is group[1] and group.cfg.metadata["hf_hook_name"] == "h.0"
    with pytest.raises(SAELensError, match=r"holds: h\.0, h\.1\.mlp"):
        group["h.2"]
    saelens_folder(tmp_path / "one")
    single = load_sae_group(tmp_path / "one")
    assert single.names == ["one"]
    with pytest.raises(SAELensError, match="does not exist"):
        load_sae_group(tmp_path / "missing")


def test_session_loader_and_load_model_and_sae(
    tiny_gpt2_dir: Path, tiny_corpus_text: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_corpus_text)
    hook = "blocks.1.hook_resid_post"
    sae_cfg = make_sae_config(
        "topk",
        d_in=64,
        d_sae=128,
        k=8,
        metadata={
            "model_name": str(tiny_gpt2_dir),
            "hook_name": hook,
            "hook_layer": 1,
            "context_size": 16,
            "dataset_path": str(corpus),
            # What SAELens records for SAEs trained on a processed HookedTransformer.
            "model_from_pretrained_kwargs": {"center_writing_weights": True},
        },
    )
    torch.manual_seed(0)
    for name in ("a", "b"):
        SparseAutoencoder(sae_cfg).save_model(tmp_path / "run" / name)
    runner_cfg = make_runner_config(
        model_name=str(tiny_gpt2_dir),
        hook_point=hook,
        dataset_path=str(corpus),
        context_size=16,
        train_batch_size=32,
        store_batch_size=4,
        n_batches_in_buffer=2,
        n_eval_sequences=0,
    )
    model, group, store = LMSparseAutoencoderSessionloader(runner_cfg).load_sae_training_group_session(
        tmp_path / "run"
    )
    assert group.names == ["a", "b"]
    batch = store.next_batch()
    assert batch.shape == (32, 64) and torch.isfinite(batch).all()
    with torch.no_grad():
        assert group["a"](batch).shape == (32, 64)
    # The SAE's own metadata is enough for load_model_and_sae (and for the session loader).
    model2, sae = load_model_and_sae(str(tmp_path / "run"), "b")
    assert isinstance(sae, TopKSAE) and sae.cfg.metadata["hook_name"] == hook
    tokens = model2.to_tokens("the red cat sat on the mat .")
    # Booted like the HookedTransformer the metadata describes: writing weights centred, so the
    # residual stream has zero mean over d_model; the session's plain bridge does not.
    assert model2.compatibility_mode and not getattr(model, "compatibility_mode", False)
    caches = [
        m.run_with_cache(tokens, names_filter=lambda name: name == hook)[1][hook] for m in (model2, model)
    ]
    assert caches[0].shape[-1] == 64
    assert caches[0].mean(-1).abs().max() < 1e-4 < caches[1].mean(-1).abs().max()
    from_sae_cfg = LMSparseAutoencoderSessionloader(sae.cfg)
    assert from_sae_cfg.cfg.hook_point == hook and from_sae_cfg.cfg.context_size == 16
    assert model.cfg.d_model == model2.cfg.d_model == 64
