"""SAE folders (sae_lens/sae_files.py): saving and loading our format, SAELens 6.x, SAELens before
6.0, broken folders, the format registry and the safe readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sae_lens.errors import SAELensError
from sae_lens.sae_files import load_sparsity
from sae_lens.saes import SparseAutoencoder, StandardSAE, TopKSAE
from tests.conftest import make_sae_config

D_IN, D_SAE = 8, 16


def make_sae(architecture: str = "standard", d_in: int = D_IN, d_sae: int = D_SAE, **kw: Any):
    torch.manual_seed(0)
    sae = SparseAutoencoder(make_sae_config(architecture, d_in, d_sae, **kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def raw_weights(seed: int = 3, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen),
    }


def write_folder(folder: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def reference_forward(
    w: dict[str, torch.Tensor], x: torch.Tensor, k: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and reconstruction computed straight from the raw tensors (float64)."""
    w = {name: t.double() for name, t in w.items()}
    pre = (x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if k is None:
        acts = pre.clamp_min(0)
    else:
        acts = torch.zeros_like(pre)
        top = pre.argsort(dim=-1, descending=True)[:, :k]
        acts.scatter_(-1, top, pre.gather(-1, top).clamp_min(0))
    return acts, acts @ w["W_dec"] + w["b_dec"]


def assert_matches_reference(sae: SparseAutoencoder, w: dict[str, torch.Tensor], k: int | None) -> None:
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(9))
    acts_ref, out_ref = reference_forward(w, x, k)
    with torch.no_grad():
        acts = sae.encode(x)
        out = sae.decode(acts)
    torch.testing.assert_close(acts.double(), acts_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    if k is not None:
        assert ((acts > 0).sum(-1) <= k).all()


# -- round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "kw"),
    [
        ("standard", {"use_ghost_grads": True, "l1_coefficient": 0.25, "lp_norm": 2.0}),
        ("topk", {"k": 3, "aux_k": 5}),
    ],
)
def test_save_load_round_trip_is_exact(tmp_path: Path, architecture: str, kw: dict[str, Any]) -> None:
    sae = make_sae(architecture, metadata={"hook_name": "blocks.2.hook_resid_post", "hook_layer": 2}, **kw)
    sparsity = torch.log10(torch.rand(D_SAE, generator=torch.Generator().manual_seed(4)) + 1e-10)
    folder = sae.save_model(tmp_path / "sae", sparsity)
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]

    loaded = SparseAutoencoder.load_from_disk(folder)
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    for name, param in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name
    loaded_sparsity = load_sparsity(folder)
    assert loaded_sparsity is not None and torch.equal(loaded_sparsity, sparsity)
    x = torch.randn(5, D_IN)
    assert torch.equal(loaded(x), sae(x))


def test_round_trip_float64_and_no_sparsity(tmp_path: Path) -> None:
    sae = make_sae("topk", k=2, dtype="float64")
    folder = sae.save_model(tmp_path / "sae")
    assert load_sparsity(folder) is None
    loaded = SparseAutoencoder.load_from_disk(folder, device="cpu")
    assert loaded.W_enc.dtype == torch.float64
    assert loaded.cfg == sae.cfg
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in sae.state_dict().items())


# -- SAELens 6.x layout -------------------------------------------------------------------------------


def six_x_cfg(architecture: str, meta_key: str = "metadata") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        meta_key: {
            "model_name": "gpt2",
            "hook_name": "blocks.8.hook_resid_pre",
            "context_size": 128,
            "prepend_bos": True,
            "sae_lens_version": "6.5.1",
        },
        "architecture": architecture,
    }
    if architecture == "topk":
        cfg.update({"k": 4, "rescale_acts_by_decoder_norm": False})
    return cfg


@pytest.mark.parametrize("meta_key", ["metadata", "meta"])
def test_saelens6_topk_folder(tmp_path: Path, meta_key: str) -> None:
    w = raw_weights()
    folder = write_folder(tmp_path / "sae", six_x_cfg("topk", meta_key), w)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, TopKSAE)
    assert sae.cfg.k == 4
    assert sae.cfg.metadata["hook_name"] == "blocks.8.hook_resid_pre"
    assert sae.cfg.metadata["model_name"] == "gpt2"
    assert sae.cfg.metadata["context_size"] == 128
    assert_matches_reference(sae, w, k=4)


@pytest.mark.parametrize("meta_key", ["metadata", "meta"])
def test_saelens6_standard_folder(tmp_path: Path, meta_key: str) -> None:
    w = raw_weights(seed=5)
    folder = write_folder(tmp_path / "sae", six_x_cfg("standard", meta_key), w)
    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, StandardSAE)
    assert sae.cfg.metadata["hook_name"] == "blocks.8.hook_resid_pre"
    assert_matches_reference(sae, w, k=None)


def test_saelens6_apply_b_dec_false_is_respected(tmp_path: Path) -> None:
    w = raw_weights(seed=6)
    cfg = six_x_cfg("standard") | {"apply_b_dec_to_input": False}
    sae = SparseAutoencoder.load_from_disk(write_folder(tmp_path / "sae", cfg, w))
    x = torch.randn(4, D_IN)
    expected = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(sae(x).detach(), expected)


# -- before 6.0 ---------------------------------------------------------------------------------------


def legacy_cfg(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_point": "blocks.3.hook_resid_pre",
        "hook_point_layer": 3,
        "hook_point_head_index": None,
        "context_size": 64,
        "prepend_bos": True,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "sae_lens_training_version": "3.13.0",
    }
    cfg.update(overrides)
    return cfg


def test_legacy_topk_folder(tmp_path: Path) -> None:
    w = raw_weights(seed=7)
    cfg = legacy_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 4})
    del cfg["architecture"]
    sae = SparseAutoencoder.load_from_disk(write_folder(tmp_path / "sae", cfg, w))
    assert isinstance(sae, TopKSAE)
    assert sae.cfg.k == 4
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    assert sae.cfg.metadata["hook_layer"] == 3
    assert sae.cfg.metadata["model_name"] == "gpt2-small"
    assert sae.cfg.dtype == "float32"
    assert_matches_reference(sae, w, k=4)


def test_legacy_relu_folder_with_expansion_factor(tmp_path: Path) -> None:
    w = raw_weights(seed=8)
    cfg = legacy_cfg(expansion_factor=2)
    del cfg["d_sae"]
    sae = SparseAutoencoder.load_from_disk(write_folder(tmp_path / "sae", cfg, w))
    assert isinstance(sae, StandardSAE)
    assert sae.cfg.d_sae == 2 * D_IN == D_SAE
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    assert_matches_reference(sae, w, k=None)


def test_legacy_scaling_factor_of_ones_is_accepted(tmp_path: Path) -> None:
    w = raw_weights(seed=10) | {"scaling_factor": torch.ones(D_SAE)}
    sae = SparseAutoencoder.load_from_disk(write_folder(tmp_path / "sae", legacy_cfg(), w))
    assert "scaling_factor" not in sae.state_dict()
    assert_matches_reference(sae, raw_weights(seed=10), k=None)


def test_legacy_nontrivial_scaling_factor_scales_latents_in_decode(tmp_path: Path) -> None:
    # Before 6.0: x_hat = (f * scaling_factor) @ W_dec + b_dec.
    w = raw_weights(seed=11)
    scale = torch.linspace(0.5, 2.0, D_SAE)
    folder = write_folder(tmp_path / "sae", legacy_cfg(), w | {"scaling_factor": scale})
    sae = SparseAutoencoder.load_from_disk(folder)
    x = torch.randn(6, D_IN)
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae(x).detach(), (f * scale) @ w["W_dec"] + w["b_dec"])


# -- errors -------------------------------------------------------------------------------------------


def assert_one_line_error(folder: Path, *fragments: str) -> str:
    with pytest.raises(SAELensError) as info:
        SparseAutoencoder.load_from_disk(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_weights_file(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", six_x_cfg("topk"), raw_weights())
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(folder, "sae_weights.safetensors", "truncated")


def test_garbage_weights_file(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", six_x_cfg("topk"), raw_weights())
    (folder / "sae_weights.safetensors").write_bytes(b"\x00\xffnot a safetensors file at all" * 4)
    assert_one_line_error(folder, "sae_weights.safetensors", "corrupt")


def test_missing_weights_file(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", six_x_cfg("topk"), raw_weights())
    (folder / "sae_weights.safetensors").unlink()
    assert_one_line_error(folder, "sae_weights.safetensors")


def test_missing_cfg(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", six_x_cfg("topk"), raw_weights())
    (folder / "cfg.json").unlink()
    assert_one_line_error(folder, "cfg.json")
    # A folder that is not there is named as such (formats other than SAELens' need no cfg.json).
    assert_one_line_error(tmp_path / "does_not_exist", "does_not_exist", "does not exist")


def test_invalid_json_cfg(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "sae", six_x_cfg("topk"), raw_weights())
    (folder / "cfg.json").write_text("{not json")
    assert_one_line_error(folder, "cfg.json", "JSON")


def test_unknown_architecture_lists_known_ones(tmp_path: Path) -> None:
    cfg = six_x_cfg("standard") | {"architecture": "gated-ish"}
    folder = write_folder(tmp_path / "sae", cfg, raw_weights())
    assert_one_line_error(folder, "gated-ish", "standard", "topk")


def test_shape_mismatch_between_cfg_and_weights(tmp_path: Path) -> None:
    cfg = six_x_cfg("topk") | {"d_sae": 12}
    folder = write_folder(tmp_path / "sae", cfg, raw_weights())
    # Weights are checked against the config whichever format supplied it (not only cfg.json).
    message = assert_one_line_error(folder, "shape", "from the config")
    assert "12" in message and "16" in message


def test_missing_tensor_in_weights(tmp_path: Path) -> None:
    w = raw_weights()
    del w["b_dec"]
    folder = write_folder(tmp_path / "sae", six_x_cfg("standard"), w)
    assert_one_line_error(folder, "missing", "b_dec")


def test_cfg_without_d_in_or_d_sae(tmp_path: Path) -> None:
    cfg = six_x_cfg("standard")
    del cfg["d_sae"]
    assert_one_line_error(write_folder(tmp_path / "a", cfg, raw_weights()), "d_sae")
    cfg = six_x_cfg("standard")
    del cfg["d_in"]
    assert_one_line_error(write_folder(tmp_path / "b", cfg, raw_weights()), "d_in")


# -- the format registry and the readers -------------------------------------------------------------


@pytest.fixture
def toy_format() -> Any:
    """A format whose folders hold `toy.safetensors` (our layout) and no cfg.json; unregistered after."""
    from sae_lens import sae_files

    def detect(folder: Path) -> bool:
        return (folder / "toy.safetensors").is_file()

    def read(folder: Path, device: str | None) -> sae_files.SAEFiles:
        state = sae_files.read_safetensors(folder / "toy.safetensors", device)
        d_sae, d_in = state["W_dec"].shape
        config = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "metadata": {"hook_name": "toy"}}
        return sae_files.SAEFiles(config, state)

    sae_files.register_format("toy", detect, read, priority=10)
    try:
        yield sae_files
    finally:
        sae_files._FORMATS.pop("toy", None)


def test_a_registered_format_is_detected_and_loads(tmp_path: Path, toy_format: Any) -> None:
    assert toy_format.registered_formats()[0] == "toy"  # ascending priority; saelens (100) last
    assert toy_format.registered_formats()[-1] == "saelens"
    w = raw_weights(seed=12)
    folder = tmp_path / "toy"
    folder.mkdir()
    save_file(w, str(folder / "toy.safetensors"))
    sae = SparseAutoencoder.load_from_disk(folder)
    assert isinstance(sae, StandardSAE) and sae.cfg.metadata["hook_name"] == "toy"
    assert_matches_reference(sae, w, k=None)
    # Naming a format skips detection; an unknown name lists the known ones.
    files = toy_format.read_sae_folder(folder, format_name="toy")
    assert torch.equal(files.state_dict["W_enc"], w["W_enc"]) and files.log_feature_sparsity is None
    with pytest.raises(SAELensError, match=r"known formats: .*saelens"):
        toy_format.read_sae_folder(folder, format_name="nope")


def test_a_folder_of_no_known_format_lists_what_it_holds(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x")
    message = assert_one_line_error(folder, "cfg.json", "saelens", "weights.bin")
    assert "no other known format" in message


def test_read_json_and_read_safetensors_errors(tmp_path: Path) -> None:
    from sae_lens.sae_files import read_json, read_safetensors

    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SAELensError, match="JSON object"):
        read_json(tmp_path / "list.json")
    with pytest.raises(SAELensError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(SAELensError, match=r"needs missing\.safetensors"):
        read_safetensors(tmp_path / "missing.safetensors")
    save_file({"a": torch.arange(3.0)}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(read_safetensors(tmp_path / "ok.safetensors")["a"], torch.arange(3.0))


def test_saelens_config_normalises_old_layouts() -> None:
    from sae_lens.sae_files import saelens_config

    legacy = legacy_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 4}, expansion_factor=2)
    del legacy["architecture"], legacy["d_sae"]
    cfg = saelens_config(legacy)
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 2 * D_IN
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_pre"
    assert cfg["metadata"]["hook_layer"] == 3 and cfg["metadata"]["model_name"] == "gpt2-small"
    assert "activation_fn_kwargs" not in cfg
    six = saelens_config(six_x_cfg("standard", "meta"))
    assert six["metadata"]["hook_name"] == "blocks.8.hook_resid_pre" and six["architecture"] == "standard"
    with pytest.raises(SAELensError, match="normalize_activations"):
        saelens_config(six_x_cfg("standard") | {"normalize_activations": "layer_norm"})


def test_fold_topk_decoder_norms_by_hand() -> None:
    from sae_lens.sae_files import fold_topk_decoder_norms

    state = {
        "W_enc": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b_enc": torch.tensor([1.0, -1.0]),
        "W_dec": torch.tensor([[3.0, 4.0], [0.0, 0.5]]),  # row norms 5 and 0.5
        "b_dec": torch.tensor([0.25, 0.5]),
    }
    folded = fold_topk_decoder_norms(state)
    torch.testing.assert_close(folded["W_enc"], torch.tensor([[5.0, 1.0], [15.0, 2.0]]))
    torch.testing.assert_close(folded["b_enc"], torch.tensor([5.0, -0.5]))
    torch.testing.assert_close(folded["W_dec"], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert folded["b_dec"] is state["b_dec"] and folded["W_enc"].dtype == torch.float32


def test_write_sae_folder_writes_each_file_and_no_temporaries(tmp_path: Path) -> None:
    from sae_lens.sae_files import write_sae_folder

    folder = write_sae_folder(tmp_path / "sae", {"d_in": 2}, {"W": torch.ones(2)}, torch.zeros(3))
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    assert json.loads((folder / "cfg.json").read_text()) == {"d_in": 2}
    sparsity = load_sparsity(folder)
    assert sparsity is not None and torch.equal(sparsity, torch.zeros(3))
