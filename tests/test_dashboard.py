"""Dashboard statistics (`sae_lens.dashboard`) against brute force on small inputs, the one-model-pass
guarantee, and the `dashboard` / `inspect` commands' exit codes.

The brute-force references encode every token of the same rows at once and compute each statistic
directly (topk, torch.quantile, torch.histogram, torch.corrcoef, cosine matrices, W_dec @ W_U).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens import dashboard as dash
from sae_lens.cli import main as cli_main
from sae_lens.errors import SAELensError
from sae_lens.html.dashboard import read_dashboard_data
from sae_lens.saes.sae import SparseAutoencoder
from tests.conftest import make_sae_config

TINY_HOOK = "blocks.0.hook_resid_post"
CONFIG = dash.DashboardConfig(
    n_top_examples=5,
    n_samples=12,
    n_intervals=4,
    n_examples_per_interval=3,
    context_before=3,
    context_after=2,
)


def tiny_sae(architecture: str, d_sae: int = 48, seed: int = 0, **options: Any) -> SparseAutoencoder:
    """A random SAE on the tiny GPT-2's `blocks.0.hook_resid_post` (d_model 64)."""
    torch.manual_seed(seed)
    metadata = {"model_name": "tiny", "hook_name": TINY_HOOK, "context_size": 32, "prepend_bos": True}
    return SparseAutoencoder(
        make_sae_config(architecture, d_in=64, d_sae=d_sae, metadata=metadata, **options)
    )


def brute_force(
    sae: SparseAutoencoder, store: Any, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All latents `[tokens, d_sae]` of `tokens` at once (excluded tokens zeroed) and the keep mask."""
    with torch.no_grad():
        acts = sae.encode(store.get_activations(tokens)).reshape(-1, sae.cfg.d_sae)
    keep = ~torch.isin(tokens.reshape(-1), store.excluded_token_ids)
    acts[~keep] = 0
    return acts, keep


@pytest.fixture(scope="module", params=["topk", "standard"])
def collected(
    request: pytest.FixtureRequest, tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor
) -> dict[str, Any]:
    """Statistics of every feature of a TopK (sparse pair path) or standard (dense path) SAE, four
    rows per batch, with the brute-force latents of the same rows."""
    sae = tiny_sae(request.param, k=4) if request.param == "topk" else tiny_sae(request.param)
    store = dash.make_store(tiny_gpt2, sae)
    batches = list(tiny_gpt2_tokens.split(4))
    stats = dash.collect_feature_statistics(sae, store, batches, None, CONFIG)
    acts, keep = brute_force(sae, store, tiny_gpt2_tokens)
    return {
        "architecture": request.param,
        "sae": sae,
        "store": store,
        "stats": stats,
        "acts": acts,
        "keep": keep,
        "tokens": tiny_gpt2_tokens,
    }


def test_counts_density_mean_max_are_exact(collected: dict[str, Any]) -> None:
    stats, acts, keep = collected["stats"], collected["acts"], collected["keep"]
    # Every row opens with BOS, which is left out: 16 rows x 31 tokens.
    assert stats.n_tokens == int(keep.sum()) == 16 * 31
    firing = acts > 0
    assert torch.equal(stats.count, firing.sum(0))
    assert (stats.count > 0).sum() > 10  # the test sees real activity
    torch.testing.assert_close(stats.density(), firing.sum(0).double() / stats.n_tokens)
    torch.testing.assert_close(stats.maximum, acts.max(0).values)
    torch.testing.assert_close(stats.total, acts.double().sum(0))
    mean = acts.double().sum(0) / firing.sum(0).clamp_min(1)
    torch.testing.assert_close(stats.mean(), mean)
    smallest = torch.where(firing, acts, torch.full_like(acts, math.inf)).min(0).values
    torch.testing.assert_close(
        stats.minimum, torch.where(firing.any(0), smallest, torch.zeros_like(smallest))
    )


def test_top_examples_are_the_top_activations_with_their_windows(collected: dict[str, Any]) -> None:
    stats, acts, tokens, sae = collected["stats"], collected["acts"], collected["tokens"], collected["sae"]
    strings = dash.TokenStrings(collected["store"].model.tokenizer)
    examples = dash.feature_examples(stats, strings)
    order = stats.top.sorted_slots()
    context = tokens.shape[1]
    checked = 0
    for feature in range(sae.cfg.d_sae):
        column = acts[:, feature]
        n_firing = int((column > 0).sum())
        expected = column.topk(min(CONFIG.n_top_examples, n_firing)).values if n_firing else column[:0]
        got = examples[feature].top
        torch.testing.assert_close(torch.tensor([e.value for e in got]), expected)
        for rank, example in enumerate(got):
            # The window: the tokens around the activating one (3 before, 2 after), cut at its row's edges.
            position = int(stats.top.positions[feature, order[feature, rank]])
            assert column[position] == example.value
            row, at = divmod(position, context)
            start, stop = max(0, at - 3), min(context, at + 3)
            assert example.tokens == strings(tokens[row, start:stop].tolist())
            torch.testing.assert_close(
                torch.tensor(example.acts), acts[row * context + start : row * context + stop, feature]
            )
            assert example.at == at - start and example.acts[example.at] == example.value
            checked += 1
    assert checked > 50


def test_histogram_counts_match_torch_histogram(collected: dict[str, Any]) -> None:
    stats, acts = collected["stats"], collected["acts"]
    for feature in range(acts.shape[1]):
        values = acts[:, feature][acts[:, feature] > 0]
        edges, counts = stats.histogram.display(
            feature, float(stats.minimum[feature]), float(stats.maximum[feature]), 8
        )
        if values.numel() == 0:
            assert (edges, counts) == ([], [])
            continue
        assert len(counts) <= 8 and len(edges) == len(counts) + 1
        assert edges[0] <= float(values.min()) and float(values.max()) < edges[-1]
        reference = torch.histogram(values.double(), bins=torch.tensor(edges, dtype=torch.float64)).hist
        assert counts == reference.long().tolist()


def test_quantile_edges_are_true_quantiles(collected: dict[str, Any]) -> None:
    stats, acts = collected["stats"], collected["acts"]
    edges = dash.interval_edges(stats)
    levels = torch.linspace(0, 1, CONFIG.n_intervals + 1, dtype=torch.float64)
    paths = {"exact": 0, "histogram": 0}
    for feature in range(acts.shape[1]):
        values = acts[:, feature][acts[:, feature] > 0].double()
        if values.numel() == 0:
            continue
        reference = torch.quantile(values, levels)
        if values.numel() <= CONFIG.n_samples:  # every activation is in the sample: exact
            torch.testing.assert_close(edges[feature], reference)
            paths["exact"] += 1
        else:  # from the fine histogram: within one fine bin of the exact quantile
            assert (edges[feature] - reference).abs().max() <= stats.histogram.bin_width(feature)
            assert edges[feature][0] == values.min() and edges[feature][-1] == values.max()
            paths["histogram"] += 1
    assert paths["histogram"] > 0
    # The standard SAE's features all fire more often than the sample holds; some TopK ones do not.
    assert paths["exact"] > 0 or collected["architecture"] == "standard"


@pytest.mark.parametrize("kind", ["quantile", "equal_width"])
def test_interval_examples_lie_in_their_labelled_interval(
    kind: str, tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor
) -> None:
    sae = tiny_sae("topk", k=4)
    store = dash.make_store(tiny_gpt2, sae)
    config = dash.DashboardConfig(
        n_samples=12, n_intervals=4, n_examples_per_interval=3, interval_kind=kind, n_correlated=0
    )
    stats = dash.collect_feature_statistics(sae, store, tiny_gpt2_tokens.split(8), None, config)
    acts, _ = brute_force(sae, store, tiny_gpt2_tokens)
    examples = dash.feature_examples(stats, dash.TokenStrings(tiny_gpt2.tokenizer))
    n_examples = 0
    for feature, found in enumerate(examples):
        values = acts[:, feature][acts[:, feature] > 0]
        if values.numel() == 0:
            assert found.intervals == []
            continue
        lows = [low for low, _, _ in found.intervals]
        if kind == "equal_width":
            expected = torch.linspace(float(values.min()), float(values.max()), 5)
            torch.testing.assert_close(
                torch.tensor([*lows, found.intervals[-1][1]]), expected, atol=1e-6, rtol=0
            )
        for low, high, group in found.intervals:
            assert len(group) <= 3
            assert [e.value for e in group] == sorted((e.value for e in group), reverse=True)
            for example in group:
                assert low - 1e-6 <= example.value <= high + 1e-6
                assert float(example.value) in values.tolist()  # a real activation of this feature
                n_examples += 1
    assert n_examples > 30


def test_correlations_match_corrcoef(collected: dict[str, Any]) -> None:
    stats, acts, keep = collected["stats"], collected["acts"], collected["keep"]
    reference = torch.corrcoef(acts[keep].T.double()).float()
    got = stats.correlations()
    defined = ~reference.isnan()
    assert defined.sum() > 100
    torch.testing.assert_close(got[defined], reference[defined], atol=2e-5, rtol=1e-4)
    # The correlated list: the most correlated other features, best first.
    pairs = dash.correlated_features(stats, 3)
    for feature in range(acts.shape[1]):
        if not pairs[feature]:
            continue
        row = reference[feature].clone()
        row[feature] = -math.inf
        best = row.nan_to_num(nan=-math.inf).topk(3)
        torch.testing.assert_close(
            torch.tensor([v for _, v in pairs[feature]]), best.values, atol=2e-5, rtol=1e-4
        )


def test_nearest_features_by_decoder_cosine() -> None:
    torch.manual_seed(3)
    W_dec = torch.randn(50, 16)
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-math.inf)
    features = torch.tensor([0, 7, 49])
    indices, values = dash.nearest_by_decoder(W_dec, features, k=4, chunk=2)
    best = cosine[features].topk(4)
    assert torch.equal(indices, best.indices)
    torch.testing.assert_close(values, best.values)
    assert not (indices == features[:, None]).any()  # never itself


def test_logit_effects_use_W_U_of_a_causal_lm(collected: dict[str, Any]) -> None:
    sae, model = collected["sae"], collected["store"].model
    unembed, source = dash.unembedding(model, 64)
    assert source == "W_U" and torch.equal(unembed, model.W_U)
    data = dash.dashboard_data(collected["stats"], sae, model, name="tiny")
    assert data["logit_source"] == "W_U"
    effects = sae.W_dec.detach() @ model.W_U
    strings = dash.TokenStrings(model.tokenizer)
    for feature in (0, 17, 47):
        top = effects[feature].topk(10)
        bottom = effects[feature].topk(10, largest=False)
        logits = data["features"][feature]["logits"]
        assert [t for t, _ in logits["top"]] == strings(top.indices.tolist())
        torch.testing.assert_close(torch.tensor([v for _, v in logits["top"]]), top.values)
        torch.testing.assert_close(torch.tensor([v for _, v in logits["bottom"]]), bottom.values)


def test_dashboard_data_renders_and_round_trips(collected: dict[str, Any], tmp_path: Path) -> None:
    from sae_lens.html import write_dashboard_html

    stats, sae, store = collected["stats"], collected["sae"], collected["store"]
    prompt = dash.prompt_features(sae, store, "the red cat sat on the mat .")
    data = dash.dashboard_data(stats, sae, store.model, name="tiny-sae", prompt=prompt)
    assert [f["index"] for f in data["features"]] == list(range(48))
    page = write_dashboard_html(data, tmp_path / "dash.html")
    back = read_dashboard_data(page)
    assert back["sae"]["d_sae"] == 48 and back["n_tokens"] == stats.n_tokens
    busiest = int(stats.count.argmax())
    sent, got = data["features"][busiest], back["features"][busiest]
    assert got["top_examples"][0]["tokens"] == sent["top_examples"][0]["tokens"]
    assert got["histogram"]["counts"] == sent["histogram"]["counts"]
    assert [n for n, _ in got["nearest"]] == [n for n, _ in sent["nearest"]]
    assert back["prompt"]["tokens"] == ["the", "red", "cat", "sat", "on", "the", "mat", "."]


def test_prompt_features_are_each_tokens_top_latents(tiny_gpt2: Any) -> None:
    sae = tiny_sae("topk", k=4)
    store = dash.make_store(tiny_gpt2, sae)
    prompt = dash.prompt_features(sae, store, "the dog ran", k=3)
    ids = tiny_gpt2.tokenizer("the dog ran", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[tiny_gpt2.tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        acts = sae.encode(store.get_activations(tokens))[0, 1:]  # the BOS row is not shown
    assert prompt["tokens"] == ["the", "dog", "ran"]
    for position, pairs in enumerate(prompt["top_features"]):
        best = acts[position].topk(3)
        assert [f for f, _ in pairs] == best.indices[best.values > 0].tolist()


def test_one_model_pass_for_any_number_of_features(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> None:
    """The model runs once per batch of rows, whether 3 features are asked for or all 48."""
    sae = tiny_sae("topk", k=4)
    store = dash.make_store(tiny_gpt2, sae)
    calls = []
    handle = tiny_gpt2.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        for features in ([3, 17, 42], None):
            calls.clear()
            dash.collect_feature_statistics(sae, store, tiny_gpt2_tokens.split(4), features, CONFIG)
            assert len(calls) == 4  # 16 rows in batches of 4: one forward each
    finally:
        handle.remove()


def test_minilm_uses_tied_embeddings_and_drops_special_tokens(minilm: Any) -> None:
    torch.manual_seed(0)
    metadata = {
        "model_name": "m",
        "hook_name": "blocks.1.hook_resid_post",
        "context_size": 16,
        "prepend_bos": True,
    }
    sae = SparseAutoencoder(make_sae_config("topk", d_in=384, d_sae=64, k=8, metadata=metadata))
    text = [{"text": "Sparse autoencoders find features. They read a model's activations at one hook."}] * 6
    config = dash.DashboardConfig(n_top_examples=3, n_samples=8, n_correlated=3)
    stores = {flag: dash.make_store(minilm, sae, text, exclude_special_tokens=flag) for flag in (True, False)}
    rows = {flag: list(dash.iter_token_batches(store, 16 * 6)) for flag, store in stores.items()}
    assert torch.equal(torch.cat(rows[True]), torch.cat(rows[False]))
    stats = {
        flag: dash.collect_feature_statistics(sae, stores[flag], rows[flag], None, config) for flag in rows
    }
    tokens = torch.cat(rows[True])
    special = torch.isin(tokens, torch.tensor(minilm.tokenizer.all_special_ids))
    assert special.any()  # [CLS] opens every row, [SEP] separates documents
    assert stats[True].n_tokens == int((~special).sum()) and stats[False].n_tokens == tokens.numel()
    # An excluded token is never an example's activating token, nor counted.
    cls_sep = {minilm.tokenizer.cls_token, minilm.tokenizer.sep_token}
    strings = dash.TokenStrings(minilm.tokenizer)
    for found in dash.feature_examples(stats[True], strings):
        for example in found.top + [e for _, _, group in found.intervals for e in group]:
            assert example.tokens[example.at] not in cls_sep
    data = dash.dashboard_data(stats[True], sae, minilm, name="minilm")
    assert data["logit_source"] == "tied_embeddings"
    effects = sae.W_dec.detach() @ minilm.W_E.T
    torch.testing.assert_close(
        torch.tensor([v for _, v in data["features"][5]["logits"]["top"]]), effects[5].topk(10).values
    )


def test_parse_features() -> None:
    assert dash.parse_features("all", 5) == [0, 1, 2, 3, 4]
    assert dash.parse_features("1:4", 10) == [1, 2, 3]
    assert dash.parse_features(":2,7", 10) == [0, 1, 7]
    assert dash.parse_features("8:", 10) == [8, 9]
    assert dash.parse_features("42, 3,17,3", 100) == [3, 17, 42]
    for bad, message in (
        ("0:200", "out of bounds"),
        ("5,10", "out of range"),
        ("-1", "out of range"),
        ("a:b", "cannot read"),
    ):
        with pytest.raises(SAELensError, match=message):
            dash.parse_features(bad, 10)


def test_running_top_and_sample_match_global_selection() -> None:
    """Batch-by-batch merges equal one global topk; the sample holds distinct real entries."""
    generator = torch.Generator().manual_seed(0)
    n_features, size = 6, 4
    kept = dash._KeptActivations(n_features, size, window=1, device=torch.device("cpu"))
    everything = []
    for batch in range(5):
        n = 30
        feature = torch.randint(0, n_features - 1, (n,), generator=generator)  # the last one never fires
        values = torch.rand(n, generator=generator)
        positions = torch.arange(n) + 100 * batch
        kept.offer(feature, values, values, positions, lambda e, v=values: v[e][:, None])
        everything.append((feature, values, positions))
    feature, values, positions = (torch.cat(parts) for parts in zip(*everything, strict=True))
    for row in range(n_features):
        expected = values[feature == row].topk(min(size, int((feature == row).sum()))).values
        order = kept.keys[row].argsort(descending=True)[: expected.numel()]
        torch.testing.assert_close(kept.values[row, order], expected)
        torch.testing.assert_close(kept.windows[row, order, 0], expected)  # windows travel with entries
        assert set(kept.positions[row, order].tolist()) <= set(positions[feature == row].tolist())
    assert (kept.positions[-1] == -1).all()


def test_doubling_histogram_stays_exact_as_the_range_grows() -> None:
    histogram = dash._DoublingHistogram(2, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    seen: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]
    for scale in (0.3, 1.0, 7.0, 60.0):  # each batch may double the range several times
        feature = torch.randint(0, 2, (200,), generator=generator)
        values = torch.rand(200, generator=generator) * scale + 1e-3
        batch_max = torch.zeros(2).scatter_reduce_(0, feature, values, "amax")
        histogram.add(feature, values, batch_max)
        for row in range(2):
            seen[row] = torch.cat([seen[row], values[feature == row]])
    for row in range(2):
        assert histogram.top[row] > seen[row].max() >= histogram.top[row] / 2
        edges, counts = histogram.display(row, float(seen[row].min()), float(seen[row].max()), 16)
        reference = torch.histogram(seen[row].double(), bins=torch.tensor(edges, dtype=torch.float64)).hist
        assert counts == reference.long().tolist() and sum(counts) == seen[row].numel()


# -- the command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_sae(
    tiny_gpt2_dir: Path, tiny_corpus_text: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A saved TopK SAE whose metadata names the tiny GPT-2 folder and a text file of its corpus."""
    folder = tmp_path_factory.mktemp("dash_cli")
    (folder / "corpus.txt").write_text(tiny_corpus_text)
    (folder / "empty.txt").write_text("the cat")  # shorter than one row
    (folder / "afile").write_text("")
    sae = tiny_sae("topk", k=4)
    sae.cfg.metadata.update(model_name=str(tiny_gpt2_dir), dataset_path=str(folder / "corpus.txt"))
    sae.save_model(folder / "sae")
    narrow = SparseAutoencoder(
        make_sae_config("topk", d_in=32, d_sae=16, k=2, metadata=dict(sae.cfg.metadata))
    )
    narrow.save_model(folder / "narrow")
    return {"root": folder, "sae": folder / "sae", "narrow": folder / "narrow"}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dashboard_command_writes_html_and_neuronpedia(
    cli_sae: dict[str, Path], tiny_gpt2: Any, capsys: Any
) -> None:
    from sae_lens.text_datasets import load_text_dataset

    # The rows the command reads: 8 rows of 32 from the corpus file; BOS opens each row and joins documents.
    store = dash.make_store(
        tiny_gpt2, tiny_sae("topk", k=4), load_text_dataset(str(cli_sae["root"] / "corpus.txt"))
    )
    rows = torch.cat(list(dash.iter_token_batches(store, 256)))
    n_kept = int((rows != tiny_gpt2.tokenizer.bos_token_id).sum())
    assert rows.shape == (8, 32) and n_kept < 8 * 31
    out = cli_sae["root"] / "dash.html"
    small = ["--n-tokens", "256", "--quiet"]
    code, stdout, _ = run_cli(
        ["dashboard", str(cli_sae["sae"]), "--features", "0:8", "--out", str(out), *small], capsys
    )
    assert code == 0 and "8 features" in stdout
    data = read_dashboard_data(out)
    assert [f["index"] for f in data["features"]] == list(range(8))
    assert (
        data["n_tokens"] == n_kept and data["interval_kind"] == "quantile" and data["logit_source"] == "W_U"
    )
    folder = cli_sae["root"] / "np"
    args = [
        "dashboard",
        str(cli_sae["sae"]),
        "--features",
        "3,5",
        "--format",
        "neuronpedia",
        "--out",
        str(folder),
    ]
    code, _, _ = run_cli([*args, "--intervals", "equal_width", *small], capsys)
    assert code == 0
    batch = json.loads((folder / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [3, 5]


def test_inspect_command_prints_the_table_and_writes_html(cli_sae: dict[str, Path], capsys: Any) -> None:
    page = cli_sae["root"] / "prompt.html"
    code, stdout, _ = run_cli(
        ["inspect", str(cli_sae["sae"]), "the red cat sat", "--html", str(page)], capsys
    )
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == 'Prompt: "the red cat sat"'
    assert [line.split()[1] for line in lines[4:8]] == ['"the"', '"red"', '"cat"', '"sat"']
    assert read_dashboard_data(page)["prompt"]["tokens"] == ["the", "red", "cat", "sat"]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing_sae", "does not exist"),
        ("hook_missing", "not found"),
        ("width_wrong", "has width 64"),
        ("features_out_of_range", "out of bounds"),
        ("empty_dataset", "yields no row"),
        ("unwritable_out", "cannot write --out"),
        ("inspect_missing_sae", "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    case: str, fragment: str, cli_sae: dict[str, Path], capsys: Any
) -> None:
    root, sae = cli_sae["root"], str(cli_sae["sae"])
    out = ["--out", str(root / f"{case}.html"), "--n-tokens", "64", "--quiet"]
    args = {
        "missing_sae": ["dashboard", str(root / "no_such_sae"), *out],
        "hook_missing": ["dashboard", sae, "--hook", "blocks.9.hook_resid_post", *out],
        "width_wrong": ["dashboard", str(cli_sae["narrow"]), *out],
        "features_out_of_range": ["dashboard", sae, "--features", "40:60", *out],
        "empty_dataset": ["dashboard", sae, "--dataset", str(root / "empty.txt"), *out],
        "unwritable_out": ["dashboard", sae, "--out", str(root / "afile" / "dash.html")],
        "inspect_missing_sae": ["inspect", str(root / "no_such_sae"), "some text"],
    }[case]
    code, _, stderr = run_cli(args, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sae-lens: error:") and fragment in lines[0], stderr
    assert not (root / f"{case}.html").exists()


def test_console_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_lens",
            "dashboard",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "d.html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sae-lens: error: SAE folder {str(tmp_path / 'missing')!r} does not exist; pass a folder holding cfg.json"
    ]
