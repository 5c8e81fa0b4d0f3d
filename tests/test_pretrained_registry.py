"""Structure and facts of the pretrained-SAE registry `sae_lens/pretrained_saes.yaml`.

The registry is data that `SparseAutoencoder.from_pretrained(release, sae_id)` trusts to build download
paths and configs, so every entry is checked here: required keys, allowed converter and architecture
names, ids unique within a release, paths that stay inside the repo, widths that agree with the
`width_16k`-style names in Gemma Scope paths, and a few published facts checked by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "sae_lens" / "pretrained_saes.yaml"

CONVERSION_FUNCS = {
    "saelens",
    "sparsify",
    "dictionary_learning",
    "gemma_scope",
    "gemma_scope_2",
    "llama_scope",
    "connor_rob_hook_z",
}
ARCHITECTURES = {"standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"}
RELEASE_KEYS_REQUIRED = {"repo_id", "model", "conversion_func", "architecture", "saes"}
RELEASE_KEYS_OPTIONAL = {"kind", "config_overrides", "links"}
SAE_KEYS_REQUIRED = {"id", "path", "hook_name", "d_sae"}
SAE_KEYS_OPTIONAL = {"hook_name_out", "l0", "variance_explained", "neuronpedia", "norm_scaling_factor"}
LINK_KEYS = {"model", "dataset", "paper"}

# TransformerLens-3-style hook names the registry may use.
HOOK_NAME_RE = re.compile(
    r"hook_embed|blocks\.\d+\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_out|hook_attn_out"
    r"|attn\.hook_z|ln2\.hook_normalized)"
)
WIDTH_TOKENS = {
    "4k": 4096,
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
WIDTH_IN_PATH_RE = re.compile(r"width_(\d+[km])(?=/|_|$)")

REQUIRED_RELEASES = [
    "gpt2-small-res-jb",
    "gpt2-small-res-jb-feature-splitting",
    "gpt2-small-hook-z-kk",
    "gpt2-small-mlp-tm",
    "gpt2-small-mlp-out-v5-32k",
    "gpt2-small-mlp-out-v5-128k",
    "gpt2-small-resid-post-v5-32k",
    "gpt2-small-resid-post-v5-128k",
    *(
        f"gemma-scope-{size}-pt-{site}{suffix}"
        for size in ("2b", "9b")
        for site in ("res", "mlp", "att")
        for suffix in ("", "-canonical")
    ),
    *(f"llama_scope_lx{site}_{factor}" for site in "ram" for factor in ("8x", "32x")),
    "pythia-70m-deduped-res-sm",
    "pythia-70m-deduped-att-sm",
    "pythia-70m-deduped-mlp-sm",
    "sae_bench_pythia70m_sweep_gated_ctx128_0730",
    "sae_bench_pythia70m_sweep_panneal_ctx128_0730",
    "sae_bench_pythia70m_sweep_standard_ctx128_0712",
    "sae_bench_pythia70m_sweep_topk_ctx128_0730",
    *(
        f"sae_bench_gemma-2-2b_{flavour}_width-2pow{power}_date-1109"
        for flavour in ("topk", "vanilla")
        for power in (12, 14, 16)
    ),
    "eleuther-llama-3-8b-32x",
    "eleuther-pythia-70m-32k",
    "eleuther-pythia-160m-32k",
]


@pytest.fixture(scope="module")
def registry() -> dict[str, dict[str, Any]]:
    with REGISTRY_PATH.open() as handle:
        data = yaml.safe_load(handle)
    assert isinstance(data, dict) and data, "the registry must be a non-empty mapping"
    return data


def all_saes(registry: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, entry) for name, body in registry.items() for entry in body["saes"]]


def by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in body["saes"]}


def test_release_keys_and_allowed_values(registry: dict[str, dict[str, Any]]) -> None:
    for name, body in registry.items():
        keys = set(body)
        assert keys >= RELEASE_KEYS_REQUIRED, (name, RELEASE_KEYS_REQUIRED - keys)
        assert keys <= RELEASE_KEYS_REQUIRED | RELEASE_KEYS_OPTIONAL, (name, keys)
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", body["repo_id"]), (name, body["repo_id"])
        assert isinstance(body["model"], str) and body["model"], name
        assert body["conversion_func"] in CONVERSION_FUNCS, (name, body["conversion_func"])
        assert body["architecture"] in ARCHITECTURES, (name, body["architecture"])
        assert body.get("kind", "transcoder") == "transcoder", name
        assert isinstance(body.get("config_overrides", {}), dict), name
        links = body.get("links", {})
        assert set(links) <= LINK_KEYS, (name, links)
        assert all(url.startswith("https://") for url in links.values()), (name, links)
        assert isinstance(body["saes"], list) and body["saes"], name


def test_sae_entries_have_required_keys_and_sane_values(registry: dict[str, dict[str, Any]]) -> None:
    for name, entry in all_saes(registry):
        keys = set(entry)
        assert keys >= SAE_KEYS_REQUIRED, (name, entry)
        assert keys <= SAE_KEYS_REQUIRED | SAE_KEYS_OPTIONAL, (name, entry)
        assert isinstance(entry["id"], str) and entry["id"], (name, entry)
        assert type(entry["d_sae"]) is int and entry["d_sae"] > 0, (name, entry)
        assert HOOK_NAME_RE.fullmatch(entry["hook_name"]), (name, entry["hook_name"])
        if "l0" in entry:
            assert isinstance(entry["l0"], int | float) and 0 < entry["l0"] < entry["d_sae"], (name, entry)
        if "variance_explained" in entry:
            assert isinstance(entry["variance_explained"], int | float), (name, entry)
            assert 0 < entry["variance_explained"] <= 1, (name, entry)
        if "norm_scaling_factor" in entry:
            assert entry["norm_scaling_factor"] > 0, (name, entry)
        if "neuronpedia" in entry:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry["neuronpedia"]), (name, entry)


def test_hook_name_out_exactly_for_transcoders(registry: dict[str, dict[str, Any]]) -> None:
    transcoders = [name for name, body in registry.items() if body.get("kind") == "transcoder"]
    assert "gemma-scope-2b-pt-transcoders" in transcoders
    for name, body in registry.items():
        for entry in body["saes"]:
            if name in transcoders:
                assert HOOK_NAME_RE.fullmatch(entry.get("hook_name_out", "")), (name, entry)
                assert entry["hook_name_out"] != entry["hook_name"], (name, entry)
            else:
                assert "hook_name_out" not in entry, (name, entry)


def test_no_duplicate_ids_within_a_release(registry: dict[str, dict[str, Any]]) -> None:
    for name, body in registry.items():
        ids = [entry["id"] for entry in body["saes"]]
        duplicates = sorted({sae_id for sae_id in ids if ids.count(sae_id) > 1})
        assert not duplicates, (name, duplicates)


def test_paths_are_relative_and_stay_inside_the_repo(registry: dict[str, dict[str, Any]]) -> None:
    for name, entry in all_saes(registry):
        path = entry["path"]
        assert isinstance(path, str) and path, (name, entry)
        assert not path.startswith(("/", "~")), (name, path)
        assert "\\" not in path and "://" not in path, (name, path)
        assert not re.match(r"[A-Za-z]:", path), (name, path)
        parts = path.split("/")
        assert all(part not in ("", ".", "..") for part in parts), (name, path)


def test_required_releases_present(registry: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in REQUIRED_RELEASES if name not in registry]
    assert not missing, missing


def test_gpt2_small_res_jb_has_exactly_the_13_residual_saes(registry: dict[str, dict[str, Any]]) -> None:
    body = registry["gpt2-small-res-jb"]
    assert body["repo_id"] == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert body["model"] == "gpt2"
    assert body["conversion_func"] == "saelens"
    expected = [f"blocks.{layer}.hook_resid_pre" for layer in range(12)] + ["blocks.11.hook_resid_post"]
    assert [entry["id"] for entry in body["saes"]] == expected
    for entry in body["saes"]:
        assert entry["hook_name"] == entry["id"] == entry["path"]
        assert entry["d_sae"] == 24576  # 32 x d_model 768
    assert by_id(body)["blocks.8.hook_resid_pre"]["neuronpedia"] == "gpt2-small/8-res-jb"


@pytest.mark.parametrize("site", ["resid-post", "resid-mid", "mlp-out", "attn-out"])
@pytest.mark.parametrize(("size", "width"), [("32k", 32768), ("128k", 131072)])
def test_openai_v5_releases_are_topk_with_their_widths(
    registry: dict[str, dict[str, Any]], site: str, size: str, width: int
) -> None:
    # SAELens once loaded these as ReLU SAEs and reconstructed garbage (its issue #553).
    body = registry[f"gpt2-small-{site}-v5-{size}"]
    assert body["architecture"] == "topk"
    assert body["config_overrides"]["k"] == 32
    assert body["model"] == "gpt2"
    assert len(body["saes"]) == 12
    hook = {"resid-post": "hook_resid_post", "resid-mid": "hook_resid_mid"}.get(
        site, "hook_" + site.replace("-", "_")
    )
    for layer, entry in enumerate(body["saes"]):
        assert entry["d_sae"] == width
        assert entry["hook_name"] == f"blocks.{layer}.{hook}"
        assert f"v5_{size}_layer_{layer}" in entry["path"]


def test_gemma_scope_canonical_ids_map_to_existing_saes(registry: dict[str, dict[str, Any]]) -> None:
    canonical = [name for name in registry if name.startswith("gemma-scope-") and name.endswith("-canonical")]
    assert len(canonical) >= 6
    for name in canonical:
        body = registry[name]
        base = registry[name.removesuffix("-canonical")]
        for key in ("repo_id", "model", "conversion_func", "architecture"):
            assert body[key] == base[key], (name, key)
        base_by_path = {entry["path"]: entry for entry in base["saes"]}
        for entry in body["saes"]:
            assert entry["id"].endswith("/canonical"), (name, entry)
            # layer_12/width_16k/canonical -> layer_12/width_16k/average_l0_82
            assert entry["path"].rsplit("/", 1)[0] == entry["id"].removesuffix("/canonical"), (name, entry)
            target = base_by_path.get(entry["path"])
            assert target is not None, (name, entry["path"])
            assert (entry["hook_name"], entry["d_sae"]) == (target["hook_name"], target["d_sae"]), name


def test_gemma_scope_canonical_covers_every_layer_at_16k(registry: dict[str, dict[str, Any]]) -> None:
    for size, n_layers in [("2b", 26), ("9b", 42)]:
        for site in ("res", "mlp", "att"):
            ids = set(by_id(registry[f"gemma-scope-{size}-pt-{site}-canonical"]))
            missing = [layer for layer in range(n_layers) if f"layer_{layer}/width_16k/canonical" not in ids]
            assert not missing, (size, site, missing)


def test_widths_agree_with_width_tokens_in_paths(registry: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, entry in all_saes(registry):
        match = WIDTH_IN_PATH_RE.search(entry["path"])
        if match:
            assert entry["d_sae"] == WIDTH_TOKENS[match.group(1)], (name, entry)
            checked += 1
    assert checked > 3000  # every Gemma Scope SAE carries its width in its path


def test_gemma_scope_paths_agree_with_hooks_and_l0(registry: dict[str, dict[str, Any]]) -> None:
    site_hooks = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
    for name, body in registry.items():
        match = re.fullmatch(r"gemma-scope-\d+b-(pt|it)-(res|mlp|att)(-canonical)?", name)
        if not match:
            continue
        for entry in body["saes"]:
            l0 = re.search(r"average_l0_(\d+)$", entry["path"])
            assert l0 is not None and entry["l0"] == int(l0.group(1)), (name, entry)
            if entry["path"].startswith("embedding/"):
                assert entry["hook_name"] == "hook_embed", (name, entry)
                continue
            layer = int(re.match(r"layer_(\d+)/", entry["path"]).group(1))
            assert entry["hook_name"] == f"blocks.{layer}.{site_hooks[match.group(2)]}", (name, entry)


def test_gemma_scope_spot_facts(registry: dict[str, dict[str, Any]]) -> None:
    res = by_id(registry["gemma-scope-2b-pt-res-canonical"])
    assert res["layer_12/width_16k/canonical"]["path"] == "layer_12/width_16k/average_l0_82"
    assert res["layer_12/width_16k/canonical"]["neuronpedia"] == "gemma-2-2b/12-gemmascope-res-16k"
    assert registry["gemma-scope-2b-pt-res"]["repo_id"] == "google/gemma-scope-2b-pt-res"
    assert registry["gemma-scope-9b-pt-att"]["model"] == "google/gemma-2-9b"
    transcoder = by_id(registry["gemma-scope-2b-pt-transcoders"])["layer_0/width_16k/average_l0_76"]
    assert (transcoder["hook_name"], transcoder["hook_name_out"]) == (
        "blocks.0.ln2.hook_normalized",
        "blocks.0.hook_mlp_out",
    )


def test_gemma_scope_2_hooks_follow_the_folder(registry: dict[str, dict[str, Any]]) -> None:
    folder_hooks = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}
    releases = [name for name in registry if name.startswith("gemma-scope-2-")]
    assert releases
    for name in releases:
        assert registry[name]["conversion_func"] == "gemma_scope_2"
        for entry in registry[name]["saes"]:
            folder, leaf = entry["path"].split("/")
            layer = int(re.match(r"layer_(\d+)_", leaf).group(1))
            assert entry["hook_name"] == f"blocks.{layer}.{folder_hooks[folder]}", (name, entry)


@pytest.mark.parametrize(("factor", "width"), [("8x", 32768), ("32x", 131072)])
def test_llama_scope_widths_hooks_and_layers(
    registry: dict[str, dict[str, Any]], factor: str, width: int
) -> None:
    hooks = {"r": "hook_resid_post", "a": "hook_attn_out", "m": "hook_mlp_out"}
    for site, hook in hooks.items():
        body = registry[f"llama_scope_lx{site}_{factor}"]
        assert body["conversion_func"] == "llama_scope"
        assert body["model"] == "meta-llama/Llama-3.1-8B"
        assert [entry["id"] for entry in body["saes"]] == [f"l{layer}{site}_{factor}" for layer in range(32)]
        for layer, entry in enumerate(body["saes"]):
            assert entry["d_sae"] == width  # expansion x d_model 4096
            assert entry["hook_name"] == f"blocks.{layer}.{hook}"
            assert entry["path"] == f"Llama3_1-8B-Base-L{layer}{site.upper()}-{factor}"
            assert entry["norm_scaling_factor"] > 0


def test_dictionary_learning_releases(registry: dict[str, dict[str, Any]]) -> None:
    expected_architectures = {"gated": "gated", "panneal": "standard", "standard": "standard", "topk": "topk"}
    for sweep, architecture in expected_architectures.items():
        name = next(n for n in registry if n.startswith(f"sae_bench_pythia70m_sweep_{sweep}_"))
        body = registry[name]
        assert body["architecture"] == architecture
        # Each sweep holds 4k and 16k dictionaries (8x and 32x of d_model 512).
        assert {entry["d_sae"] for entry in body["saes"]} == {4096, 16384}, name
    for name, body in registry.items():
        power = re.search(r"width-2pow(\d+)", name)
        if power:
            assert body["conversion_func"] == "dictionary_learning", name
            assert {entry["d_sae"] for entry in body["saes"]} == {2 ** int(power.group(1))}, name
        if body["conversion_func"] == "dictionary_learning":
            for entry in body["saes"]:
                layer = re.match(r"blocks\.(\d+)\.hook_resid_post__trainer_\d+", entry["id"]).group(1)
                assert entry["hook_name"] == f"blocks.{layer}.hook_resid_post", (name, entry)


def test_sparsify_releases_use_hookpoint_ids(registry: dict[str, dict[str, Any]]) -> None:
    releases = [name for name, body in registry.items() if body["conversion_func"] == "sparsify"]
    assert len(releases) >= 3
    for name in releases:
        body = registry[name]
        assert body["architecture"] == "topk", name
        for entry in body["saes"]:
            assert entry["id"] == entry["path"], (name, entry)
            if entry["id"] == "embed_tokens":
                assert entry["hook_name"] == "hook_embed"
                continue
            layer, module = re.fullmatch(r"layers\.(\d+)(\.mlp|\.attention)?", entry["id"]).groups()
            hook = {None: "hook_resid_post", ".mlp": "hook_mlp_out", ".attention": "hook_attn_out"}[module]
            assert entry["hook_name"] == f"blocks.{layer}.{hook}", (name, entry)
    llama = registry["eleuther-llama-3-8b-32x"]
    assert llama["repo_id"] == "EleutherAI/sae-llama-3-8b-32x"
    assert {entry["d_sae"] for entry in llama["saes"]} == {32 * 4096}
    assert registry["eleuther-pythia-160m-32k"]["saes"][0]["d_sae"] == 32768


def test_hook_z_release(registry: dict[str, dict[str, Any]]) -> None:
    body = registry["gpt2-small-hook-z-kk"]
    assert body["conversion_func"] == "connor_rob_hook_z"
    assert len(body["saes"]) == 12
    for layer, entry in enumerate(body["saes"]):
        assert entry["id"] == f"blocks.{layer}.hook_z"
        assert entry["hook_name"] == f"blocks.{layer}.attn.hook_z"
        assert entry["path"].endswith(".pt") and f"_L{layer}_" in entry["path"]
        # The width is in the file name (`_ds24576_`); layers 5 and 7 are twice as wide.
        assert f"_ds{entry['d_sae']}_" in entry["path"]
        assert entry["d_sae"] == (49152 if layer in (5, 7) else 24576)


def test_feature_splitting_widths_double(registry: dict[str, dict[str, Any]]) -> None:
    widths = [entry["d_sae"] for entry in registry["gpt2-small-res-jb-feature-splitting"]["saes"]]
    assert widths == [768 * 2**i for i in range(8)]
    assert {entry["hook_name"] for entry in registry["gpt2-small-res-jb-feature-splitting"]["saes"]} == {
        "blocks.8.hook_resid_pre"
    }
