"""The Neuronpedia export: `batch-N.json` files with exactly the keys and types of SAEDashboard 0.8's
Neuronpedia runner (`NeuronpediaDashboardBatch.to_dict()`), and values checked against direct
computations on the tiny GPT-2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens import dashboard as dash
from sae_lens.neuronpedia import write_neuronpedia_batches
from tests.test_dashboard import brute_force, tiny_sae

# Read from SAEDashboard 0.8.0's neuronpedia_dashboard.py / neuronpedia_converter.py: each key with the
# JSON type its value has in a written batch file (lists name the type of their items).
BATCH_KEYS = {
    "model_id": str,
    "layer": int,
    "sae_set": str,
    "sae_id_suffix": (str, type(None)),
    "features": list,
}
FEATURE_KEYS: dict[str, Any] = {
    "feature_index": int,
    "neuron_alignment_indices": [int],
    "neuron_alignment_values": [float],
    "neuron_alignment_l1": [float],
    "correlated_neurons_indices": [int],
    "correlated_neurons_l1": [float],
    "correlated_neurons_pearson": [float],
    "correlated_features_indices": [int],
    "correlated_features_l1": [float],
    "correlated_features_pearson": [float],
    "neg_str": [str],
    "neg_values": [float],
    "pos_str": [str],
    "pos_values": [float],
    "frac_nonzero": float,
    "freq_hist_data_bar_values": [float],
    "freq_hist_data_bar_heights": [int],
    "logits_hist_data_bar_heights": [int],
    "logits_hist_data_bar_values": [float],
    "n_prompts_total": int,
    "n_tokens_in_prompt": int,
    "dataset": str,
    "decoder_weights_dist": [float],
    "activations": [dict],
    "vector": [float],
}
# bin_min / bin_contains are the int -1 for the top-activations group, floats for an interval.
ACTIVATION_KEYS: dict[str, Any] = {
    "bin_min": (int, float),
    "bin_max": float,
    "bin_contains": (int, float),
    "tokens": [str],
    "values": [float],
    "qualifying_token_index": int,
}
FEATURES = list(range(0, 48, 2))


def check_types(record: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    assert set(record) == set(schema), f"{where}: keys {sorted(set(record) ^ set(schema))} differ"
    for key, expected in schema.items():
        value = record[key]
        if isinstance(expected, list):
            assert isinstance(value, list), f"{where}.{key}"
            assert all(isinstance(v, expected[0]) and not isinstance(v, bool) for v in value), (
                f"{where}.{key}"
            )
        else:
            assert isinstance(value, expected) and not isinstance(value, bool), f"{where}.{key}: {value!r}"


@pytest.fixture(scope="module")
def exported(
    tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    sae = tiny_sae("topk", k=4)
    store = dash.make_store(tiny_gpt2, sae)
    config = dash.DashboardConfig(
        n_samples=12, n_intervals=4, n_examples_per_interval=3, neuron_correlations=True
    )
    stats = dash.collect_feature_statistics(sae, store, tiny_gpt2_tokens.split(8), FEATURES, config)
    folder = tmp_path_factory.mktemp("np")
    paths = write_neuronpedia_batches(
        stats,
        sae,
        tiny_gpt2,
        folder,
        model_id="tiny-gpt2",
        sae_set="res-tiny",
        dataset="tiny",
        features_per_batch=10,
    )
    acts, keep = brute_force(sae, store, tiny_gpt2_tokens)
    with torch.no_grad():
        hook = store.get_activations(tiny_gpt2_tokens).reshape(-1, 64)
    batches = [json.loads(p.read_text()) for p in paths]
    features = {f["feature_index"]: f for batch in batches for f in batch["features"]}
    return {"paths": paths, "folder": folder, "batches": batches, "features": features, "stats": stats, "sae": sae,
            "acts": acts, "keep": keep, "hook": hook, "model": tiny_gpt2}  # fmt: skip


def test_batch_files_have_exactly_the_saedashboard_schema(exported: dict[str, Any]) -> None:
    assert [p.name for p in exported["paths"]] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    assert [len(b["features"]) for b in exported["batches"]] == [10, 10, 4]
    for number, batch in enumerate(exported["batches"]):
        check_types(batch, BATCH_KEYS, f"batch-{number}")
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny-gpt2", 0, "res-tiny")
        for feature in batch["features"]:
            where = f"batch-{number} feature {feature['feature_index']}"
            check_types(feature, FEATURE_KEYS, where)
            assert bool(feature["activations"]) == (feature["frac_nonzero"] > 0), where
            for i, activation in enumerate(feature["activations"]):
                check_types(activation, ACTIVATION_KEYS, f"{where} activation {i}")
    assert list(exported["features"]) == FEATURES
    skipped = json.loads((exported["folder"] / "skipped_indexes.json").read_text())
    assert set(skipped) == {"model_id", "layer", "sae_set", "log_sparsity", "skipped_indexes"}
    assert skipped["skipped_indexes"] == list(range(1, 48, 2))


def test_feature_values_match_direct_computations(exported: dict[str, Any]) -> None:
    acts, keep, hook, sae = (
        exported["acts"][exported["keep"]],
        exported["keep"],
        exported["hook"],
        exported["sae"],
    )
    hook = hook[keep]
    W_dec = sae.W_dec.detach()
    effects = W_dec @ exported["model"].W_U.detach()
    for index, feature in exported["features"].items():
        column = acts[:, index]
        assert feature["frac_nonzero"] == pytest.approx(float((column > 0).float().mean()))
        assert sum(feature["freq_hist_data_bar_heights"]) == int((column > 0).sum())
        # Neuron alignment: the decoder row's 3 largest entries.
        top = W_dec[index].topk(3)
        assert feature["neuron_alignment_indices"] == top.indices.tolist()
        l1 = (top.values.abs() / W_dec[index].abs().sum()).tolist()
        assert feature["neuron_alignment_l1"] == pytest.approx(l1, abs=1e-3)
        # Logits: top/bottom 10 of W_dec[i] @ W_U, and a 50-bin histogram of the whole vector.
        assert feature["pos_values"] == pytest.approx(effects[index].topk(10).values.tolist(), abs=1e-3)
        assert feature["neg_values"] == pytest.approx(
            effects[index].topk(10, largest=False).values.tolist(), abs=1e-3
        )
        heights = torch.histc(
            effects[index], bins=50, min=float(effects[index].min()), max=float(effects[index].max())
        )
        assert feature["logits_hist_data_bar_heights"] == heights.long().tolist()
        if not (column > 0).any():
            continue
        # Correlated neurons: Pearson correlation of the feature with each hook dimension.
        pearson = torch.stack([torch.corrcoef(torch.stack([column, hook[:, d]]))[0, 1] for d in range(64)])
        expected = pearson.topk(3)
        assert feature["correlated_neurons_indices"] == expected.indices.tolist()
        assert feature["correlated_neurons_pearson"] == pytest.approx(expected.values.tolist(), abs=2e-3)
        # Correlated features: among the exported ones, itself excluded.
        others = [j for j in FEATURES if j != index and (acts[:, j] > 0).any()]
        corr = {j: float(torch.corrcoef(torch.stack([column, acts[:, j]]))[0, 1]) for j in others}
        best = sorted(corr, key=lambda j: -corr[j])[:3]
        assert feature["correlated_features_pearson"] == pytest.approx([corr[j] for j in best], abs=2e-3)


def test_activations_are_top_group_then_intervals_high_to_low(exported: dict[str, Any]) -> None:
    stats = exported["stats"]
    for row, (index, feature) in enumerate(exported["features"].items()):
        if stats.count[row] == 0:
            assert feature["activations"] == [] and feature["correlated_features_indices"] == []
            continue
        activations = feature["activations"]
        top = [a for a in activations if a["bin_min"] == -1]
        assert activations[: len(top)] == top and len(top) == min(20, int(stats.count[row]))
        for a in top:
            assert a["bin_max"] == round(float(stats.maximum[row]), 3) and a["bin_contains"] == -1
        maxima = [a["values"][a["qualifying_token_index"]] for a in top]
        assert maxima == sorted(maxima, reverse=True) and maxima[0] == pytest.approx(
            float(stats.maximum[row]), abs=1e-3
        )
        intervals = activations[len(top) :]
        assert [a["bin_max"] for a in intervals] == sorted((a["bin_max"] for a in intervals), reverse=True)
        for a in intervals:
            assert a["bin_min"] - 1e-3 <= a["values"][a["qualifying_token_index"]] <= a["bin_max"] + 1e-3
            assert 0 <= a["bin_contains"] <= float(stats.density()[row]) + 1e-9
        assert not math.isnan(feature["frac_nonzero"]) and index == int(stats.features[row])


def test_written_files_parse_as_plain_json(exported: dict[str, Any]) -> None:
    """No NaN or Infinity tokens (dead features included): strict JSON parsers read the files."""
    constants: list[str] = []
    for path in exported["paths"]:
        json.loads(Path(path).read_text(), parse_constant=constants.append)
    assert constants == []
