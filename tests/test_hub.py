"""The registry and Hugging Face downloads (sae_lens/hub.py), through the real `huggingface_hub`
client and a Hugging Face cache prefilled in the real layout (`models--owner--name/{refs/main,
blobs/, snapshots/<commit>/...}`), offline.

The end-to-end test runs in a fresh interpreter with `HF_HOME` and `HF_HUB_OFFLINE=1` set in its
environment, exactly as a user would; the others point the session's (already offline) client at a
temporary cache.
"""

from __future__ import annotations

import ast
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from sae_lens import hub
from sae_lens.errors import SAELensError
from sae_lens.sae_files import repo_path
from sae_lens.saes import JumpReLUSAE, SparseAutoencoder, StandardSAE, TopKSAE

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def prefill_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Put `files` (repo path -> bytes) into a Hugging Face hub cache as `hf_hub_download` leaves
    them: content in `blobs/`, relative symlinks in `snapshots/<commit>/`, `refs/main` -> commit.
    Returns the snapshot folder."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    return snapshot


def folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    """Every file under a local folder, keyed by `prefix/relative path`."""
    return {
        repo_path(prefix, p.relative_to(folder).as_posix()): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache that the (offline) client uses for this test."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def random_weights(d_in: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }


# The keys of jbloom/GPT2-Small-SAEs-Reformatted's cfg.json (SAELens 2.x era), at a tiny size.
def gpt2_res_jb_cfg(d_in: int = 8, d_sae: int = 32) -> dict[str, Any]:
    return {
        "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre",
        "hook_point_layer": 8,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": 128,
        "use_cached_activations": False,
        "cached_activations_path": "activations/Skylion007_openwebtext/gpt2-small/blocks.8.hook_resid_pre",
        "d_in": d_in,
        "n_batches_in_buffer": 128,
        "total_training_tokens": 300000000,
        "store_batch_size": 32,
        "device": "mps",
        "seed": 42,
        "dtype": "torch.float32",
        "b_dec_init_method": "geometric_median",
        "expansion_factor": d_sae // d_in,
        "from_pretrained_path": None,
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "lr_scheduler_name": None,
        "lr_warm_up_steps": 5000,
        "train_batch_size": 4096,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "feature_sampling_method": None,
        "resample_batches": 1028,
        "feature_reinit_scale": 0.2,
        "dead_feature_window": 5000,
        "dead_feature_estimation_method": "no_re_init",
        "dead_feature_threshold": 1e-08,
        "log_to_wandb": True,
        "wandb_project": "mats_sae_training_gpt2_small_resid_pre_5",
        "wandb_entity": None,
        "wandb_log_frequency": 100,
        "n_checkpoints": 10,
        "checkpoint_path": "checkpoints/y1t51byy",
        "d_sae": d_sae,
        "tokens_per_buffer": 67108864,
        "run_name": f"{d_sae}-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }


def gpt2_res_jb_files() -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    weights = random_weights(8, 32, seed=3)
    sparsity = torch.linspace(-6, -1, 32)
    folder = "blocks.8.hook_resid_pre"
    files = {
        f"{folder}/cfg.json": json.dumps(gpt2_res_jb_cfg()).encode(),
        f"{folder}/sae_weights.safetensors": save(weights),
        f"{folder}/sparsity.safetensors": save({"sparsity": sparsity}),
    }
    return files, weights | {"sparsity": sparsity}


class _Forbidden(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint that refuses every request (a proxy or firewall saying no)."""

    def do_HEAD(self) -> None:
        self.send_response(403)
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


END_TO_END = r"""
import json, sys
import huggingface_hub.constants as constants
from safetensors.torch import save_file
from sae_lens import SparseAutoencoder
from sae_lens.errors import SAELensError

out = {}
sae, cfg, sparsity = SparseAutoencoder.from_pretrained_with_cfg_and_sparsity("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
x = sae.W_dec[:4].detach() * 3
save_file({"x": x, "encode": sae.encode(x).detach(), "forward": sae(x).detach(), "sparsity": sparsity,
           **{k: v.detach().contiguous() for k, v in sae.state_dict().items()}}, sys.argv[1])
out["cfg"] = cfg
out["type"] = type(sae).__name__
out["cache"] = constants.HF_HUB_CACHE
for name, args in {"uncached": ("gpt2-small-res-jb", "blocks.7.hook_resid_pre")}.items():
    try:
        SparseAutoencoder.from_pretrained(*args)
    except SAELensError as error:
        out[name] = str(error)
constants.HF_HUB_OFFLINE = False  # online now, with HF_ENDPOINT pointing at a refusing server
try:
    SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.6.hook_resid_pre")
except SAELensError as error:
    out["network"] = str(error)
print(json.dumps(out))
"""


def test_from_pretrained_offline_from_a_prefilled_cache_end_to_end(
    tmp_path: Path, refusing_endpoint: str
) -> None:
    hf_home = tmp_path / "hf_home"
    files, expected = gpt2_res_jb_files()
    prefill_hf_cache(hf_home / "hub", "jbloom/GPT2-Small-SAEs-Reformatted", files)
    before = all_files(hf_home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env |= {
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": refusing_endpoint,
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", END_TO_END, str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    got = load_file(tmp_path / "out.safetensors")
    # The standard cache of HF_HOME, resolved through the registry's repo and path.
    assert out["cache"] == str(hf_home / "hub") and out["type"] == "StandardSAE"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(got[name], expected[name]), name
    assert torch.equal(got["sparsity"], expected["sparsity"])
    x = got["x"]
    acts = torch.relu((x - expected["b_dec"]) @ expected["W_enc"] + expected["b_enc"])
    torch.testing.assert_close(got["encode"], acts)
    torch.testing.assert_close(got["forward"], acts @ expected["W_dec"] + expected["b_dec"])
    meta = out["cfg"]["metadata"]
    assert meta["hook_name"] == "blocks.8.hook_resid_pre" and meta["hook_layer"] == 8
    assert meta["model_name"] == "gpt2"  # the registry's Hugging Face id, not the file's "gpt2-small"
    assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": True}
    assert meta["neuronpedia_id"] == "gpt2-small/8-res-jb" and meta["context_size"] == 128
    assert out["cfg"]["device"] == "cpu" and out["cfg"]["dtype"] == "float32"  # not the file's "mps"
    # Not cached while offline, and the Hub refusing: one line each, naming the problem.
    assert "HF_HUB_OFFLINE=1" in out["uncached"] and "blocks.7.hook_resid_pre/cfg.json" in out["uncached"]
    assert "could not reach the Hugging Face Hub" in out["network"] and "403" in out["network"]
    assert "\n" not in out["uncached"] + out["network"]
    # Nothing was written into the cache by the failed downloads.
    assert all_files(hf_home) - before <= {"hub/.locks"} and not any(
        "incomplete" in f for f in all_files(hf_home)
    )


def test_openai_v5_release_loads_as_topk_with_the_registry_k(hf_cache: Path) -> None:
    # Its files were once read as ReLU SAEs (SAELens #553): the registry's architecture wins.
    cfg = {
        "d_in": 4,
        "d_sae": 64,
        "hook_point": "blocks.0.hook_resid_post",
        "activation_fn_str": "relu",
        "model_name": "gpt2-small",
        "dtype": "float32",
    }
    weights = random_weights(4, 64, seed=1)
    prefill_hf_cache(
        hf_cache,
        "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs",
        {
            "v5_32k_layer_0.pt/cfg.json": json.dumps(cfg).encode(),
            "v5_32k_layer_0.pt/sae_weights.safetensors": save(weights),
        },
    )
    sae = SparseAutoencoder.from_pretrained("gpt2-small-resid-post-v5-32k", "blocks.0.hook_resid_post")
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 32
    assert (
        sae.cfg.metadata["context_size"] == 64
        and sae.cfg.metadata["dataset_path"] == "Skylion007/openwebtext"
    )
    x = torch.randn(5, 4)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    top = pre.topk(32, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.clamp_min(0))
    torch.testing.assert_close(sae.encode(x).detach(), acts)


def test_registry_formats_resolve_through_the_cache(hf_cache: Path) -> None:
    # Gemma Scope canonical: id -> a path in the repo; the hook comes from the registry.
    rng = np.random.default_rng(0)
    params = {
        "W_enc": rng.normal(size=(6, 16)),
        "b_enc": rng.normal(size=16),
        "W_dec": rng.normal(size=(16, 6)),
        "b_dec": rng.normal(size=6),
        "threshold": np.abs(rng.normal(size=16)),
    }
    npz = tmp_npz = hf_cache.parent / "params.npz"
    np.savez(tmp_npz, **{k: v.astype(np.float32) for k, v in params.items()})
    prefill_hf_cache(
        hf_cache,
        "google/gemma-scope-2b-pt-res",
        {"layer_12/width_16k/average_l0_82/params.npz": npz.read_bytes()},
    )
    sae = SparseAutoencoder.from_pretrained(
        "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical", dtype="float64"
    )
    assert isinstance(sae, JumpReLUSAE) and sae.W_enc.dtype == torch.float64
    meta = sae.cfg.metadata
    assert (meta["hook_name"], meta["model_name"]) == ("blocks.12.hook_resid_post", "google/gemma-2-2b")
    assert meta["neuronpedia_id"] == "gemma-2-2b/12-gemmascope-res-16k" and meta["context_size"] == 1024
    # dictionary_learning (sae_bench sweep) and sparsify releases, with the libraries' own files.
    prefill_hf_cache(
        hf_cache,
        "canrager/lm_sae",
        folder_files(
            DATA / "dictionary_learning" / "topk",
            "pythia70m_sweep_topk_ctx128_0730/resid_post_layer_3/trainer_0",
        ),
    )
    sae = SparseAutoencoder.from_pretrained(
        "sae_bench_pythia70m_sweep_topk_ctx128_0730", "blocks.3.hook_resid_post__trainer_0"
    )
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 4
    prefill_hf_cache(
        hf_cache,
        "EleutherAI/sae-pythia-70m-32k",
        folder_files(DATA / "sparsify" / "topk" / "layers.3", "layers.0.mlp"),
    )
    sae = SparseAutoencoder.from_pretrained("eleuther-pythia-70m-32k", "layers.0.mlp")
    assert isinstance(sae, TopKSAE) and sae.cfg.metadata["hook_name"] == "blocks.0.hook_mlp_out"
    assert sae.cfg.metadata["model_name"] == "EleutherAI/pythia-70m"
    # Hook-z: the registry path is a file; its config sits beside it.
    name = "gpt2-small_L0_Hcat_z_lr1.20e-03_l11.80e+00_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9"
    buffer = hf_cache.parent / "z.pt"
    torch.save(random_weights(12, 24), buffer)
    prefill_hf_cache(
        hf_cache,
        "ckkissane/attn-saes-gpt2-small-all-layers",
        {
            f"{name}.pt": buffer.read_bytes(),
            f"{name}_cfg.json": json.dumps(
                {"act_size": 12, "dict_size": 24, "act_name": "blocks.0.attn.hook_z", "layer": 0}
            ).encode(),
        },
    )
    sae = SparseAutoencoder.from_pretrained("gpt2-small-hook-z-kk", "blocks.0.hook_z")
    assert isinstance(sae, StandardSAE) and sae.cfg.metadata["hook_name"] == "blocks.0.attn.hook_z"


def test_expected_average_only_in_is_folded_with_the_registry_factor(hf_cache: Path) -> None:
    cfg = gpt2_res_jb_cfg(4, 8) | {
        "hook_point": "blocks.0.hook_mlp_out",
        "normalize_activations": "expected_average_only_in",
    }
    weights = random_weights(4, 8, seed=5)
    path = "sae_group_gpt2_blocks.0.hook_mlp_out_24576:v1"
    prefill_hf_cache(
        hf_cache,
        "tommmcgrath/gpt2-small-mlp-out-saes",
        {f"{path}/cfg.json": json.dumps(cfg).encode(), f"{path}/sae_weights.safetensors": save(weights)},
    )
    sae = SparseAutoencoder.from_pretrained("gpt2-small-mlp-tm", "blocks.0.hook_mlp_out")
    scale = 1.049317316132615  # the registry's norm_scaling_factor
    x = torch.randn(6, 4)
    # The SAE saw s * x and reconstructed s * x: folded, it takes and returns raw activations.
    scaled = x * scale
    acts = torch.relu((scaled - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    torch.testing.assert_close(
        sae(x).detach(), (acts @ weights["W_dec"] + weights["b_dec"]) / scale, rtol=1e-5, atol=1e-6
    )
    assert sae.cfg.metadata["folded_norm_scaling_factor"] == scale


def test_llama_scope_input_scale_must_agree_with_the_registry(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.converters.test_llama_scope import write_folder

    factor = 58.935251798561154  # the registry's norm_scaling_factor of l0r_8x: sqrt(d_model) / norm_in
    for name, norm_in in (("match", 8**0.5 / factor), ("mismatch", 1.0)):
        folder, _ = write_folder(
            hf_cache.parent / name, norm_in, norm_in, hook_point_in="blocks.0.hook_resid_post"
        )
        prefill_hf_cache(
            hf_cache / name, "fnlp/Llama3_1-8B-Base-LXR-8x", folder_files(folder, "Llama3_1-8B-Base-L0R-8x")
        )
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache / "match"))
    sae = SparseAutoencoder.from_pretrained("llama_scope_lxr_8x", "l0r_8x")
    assert (
        isinstance(sae, JumpReLUSAE)
        and sae.cfg.metadata["neuronpedia_id"] == "llama3.1-8b/0-llamascope-res-32k"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache / "mismatch"))
    with pytest.raises(SAELensError, match="differs from the registry's norm_scaling_factor"):
        SparseAutoencoder.from_pretrained("llama_scope_lxr_8x", "l0r_8x")


def test_an_unregistered_repo_id_with_any_known_format(hf_cache: Path) -> None:
    prefill_hf_cache(hf_cache, "someone/sparse-coders", folder_files(DATA / "sparsify" / "run_gpt2", ""))
    sae = SparseAutoencoder.from_pretrained("someone/sparse-coders", "h.1.mlp")
    expected = load_file(DATA / "sparsify" / "run_gpt2" / "expected.safetensors")
    torch.testing.assert_close(sae.encode(expected["h.1.mlp/x"]).detach(), expected["h.1.mlp/latents_dense"])
    assert sae.cfg.metadata["context_size"] == 16  # from the run's config.json, fetched as optional
    with pytest.raises(SAELensError, match=r"no cached SAE in folder 'h\.2' of") as info:
        SparseAutoencoder.from_pretrained("someone/sparse-coders", "h.2")
    assert "HF_HUB_OFFLINE=1" in str(info.value)
    # The run's root holds a config.json, which alone commits to no format (Gemma Scope 2 needs
    # params.safetensors beside it).
    with pytest.raises(SAELensError, match="no cached SAE in the root of"):
        SparseAutoencoder.from_pretrained("someone/sparse-coders")


def test_unknown_names_suggest_the_closest(hf_cache: Path) -> None:
    with pytest.raises(SAELensError, match="did you mean 'gpt2-small-res-jb'"):
        SparseAutoencoder.from_pretrained("gpt2-small-res-jbb", "blocks.8.hook_resid_pre")
    with pytest.raises(SAELensError, match=r"did you mean 'blocks\.8\.hook_resid_pre'"):
        SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pr")
    with pytest.raises(SAELensError, match="holds 13 SAEs; pass an sae_id"):
        SparseAutoencoder.from_pretrained("gpt2-small-res-jb")
    with pytest.raises(SAELensError, match="does not exist"):
        SparseAutoencoder.from_pretrained("./no/such/folder")


def test_paths_that_leave_the_repo_are_refused(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b", "~/x", "C:/x"):
        with pytest.raises(SAELensError, match="not a relative path"):
            hub.safe_relative_path(bad)
    body = {
        "repo_id": "a/b",
        "model": "gpt2",
        "conversion_func": "saelens",
        "architecture": "standard",
        "saes": [{"id": "x", "path": "../../outside", "hook_name": "blocks.0.hook_resid_pre", "d_sae": 8}],
    }
    monkeypatch.setattr(hub, "load_registry", lambda: {"evil": body})
    with pytest.raises(SAELensError, match="not a relative path"):
        SparseAutoencoder.from_pretrained("evil", "x")


def test_force_download_while_offline_is_one_line(hf_cache: Path) -> None:
    prefill_hf_cache(hf_cache, "jbloom/GPT2-Small-SAEs-Reformatted", gpt2_res_jb_files()[0])
    with pytest.raises(SAELensError, match="force_download needs the Hugging Face Hub"):
        SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre", force_download=True)


def test_registry_is_parsed_once_and_tabulated() -> None:
    assert hub.load_registry() is hub.load_registry()
    rows = hub.list_pretrained_saes("gpt2-small-res-jb-feature*")
    assert {sae.release for sae in rows} == {"gpt2-small-res-jb-feature-splitting"} and len(rows) == 8
    assert len(hub.list_pretrained_saes("LAYER_12/WIDTH_16K/CANONICAL")) >= 6  # substring, any case
    table = hub.pretrained_saes_table("gemma-scope-2b-pt-transcoders")
    line = next(row for row in table.splitlines() if "layer_0/width_16k/average_l0_76" in row)
    assert (
        "blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out" in line
        and "16k" in line
        and line.endswith("76")
    )
    summary = hub.pretrained_saes_table(summary=True)
    assert any(row.startswith("gpt2-small-res-jb ") and " 13 " in row for row in summary.splitlines())
    assert hub.pretrained_saes_table("no-such-release") == "no pretrained SAE matches 'no-such-release'"


def test_sae_lens_list_command(capsys: pytest.CaptureFixture[str]) -> None:
    from sae_lens.cli import main

    assert main(["list", "gpt2-small-res-jb"]) == 0
    out = capsys.readouterr().out
    assert "blocks.8.hook_resid_pre" in out and "24k" in out and "gpt2" in out
    assert main(["list", "zzz-nothing"]) == 2
    assert "no pretrained SAE release or id matches" in capsys.readouterr().err


def test_generated_registry_page_is_current() -> None:
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_registry_table
    finally:
        sys.path.pop(0)
    assert (REPO / "docs" / "pretrained_saes.md").read_text() == gen_registry_table.render(), (
        "run `python docs/gen_registry_table.py`"
    )


def test_loaders_import_no_sae_class() -> None:
    # sae_files, the converters and hub only build data; the SAE classes import them.
    modules = [REPO / "sae_lens" / "sae_files.py", REPO / "sae_lens" / "hub.py"]
    modules += sorted((REPO / "sae_lens" / "converters").glob("*.py"))
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            bad = [
                n for n in names if n.startswith(("sae_lens.saes", "sae_lens.pretrained", "sae_lens.config"))
            ]
            assert not bad, (path.name, bad)
