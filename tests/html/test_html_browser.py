"""The pages in a real headless Chromium: clean loads (no console error, no request, no CSP
violation), non-blank screenshots, and the interactions a person uses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, PageRecord, luminance_stats
from synthetic_dashboard import N_FEATURES, synthetic_dashboard_data

from sae_lens.html import write_dashboard_html
from sae_lens.html.dashboard import read_dashboard_data

READY = "body[data-ready=true]"


@pytest.fixture(scope="module")
def decoded(dashboard_page: Path) -> dict[str, Any]:
    """The page's own data as the page sees it (3-significant-digit scalars, quantised acts)."""
    return read_dashboard_data(dashboard_page)


def assert_clean(record: PageRecord) -> None:
    assert record.errors() == []
    assert record.network_requests() == []
    assert record.requests == [record.url.split("#")[0]]  # the document itself, nothing else
    assert record.csp_violations() == []


def shown(token: str) -> str:
    """How the page prints a token inside a context (dashboard.js showToken)."""
    if token == "":
        return "∅"
    return token.replace("\n", "↵").replace("\r", "␍").replace("\t", "⇥")


def context_text(example: dict[str, Any]) -> str:
    return "".join(shown(t) for t in example["tokens"])


def top_tokens(feature: dict[str, Any]) -> list[str]:
    """dashboard.js topTokensOf: the first max-activating token of each top example, distinct, up to 8."""
    out: list[str] = []
    for example in feature["top_examples"]:
        acts = example["acts"]
        token = example["tokens"][max(range(len(acts)), key=lambda i: (acts[i], -i))]
        if token not in out:
            out.append(token)
        if len(out) == 8:
            break
    return out


def visible_row_indices(page: Any) -> list[int]:
    return page.eval_on_selector_all(".list-row", "rows => rows.map(r => Number(r.dataset.index))")


def assert_feature_shown(page: Any, feature: dict[str, Any]) -> None:
    page.wait_for_selector(f'#feature-view[data-index="{feature["index"]}"]')
    assert page.inner_text("#feature-title") == f"Feature {feature['index']}"
    texts = page.eval_on_selector_all("#top-examples .ctx .toks", "nodes => nodes.map(n => n.textContent)")
    assert texts == [context_text(e) for e in feature["top_examples"]]


def test_dashboard_loads_clean_and_renders(
    browser: Browser, dashboard_page: Path, decoded: dict[str, Any]
) -> None:
    with browser.open(dashboard_page, ready=READY) as record:
        page = record.page
        first = decoded["features"][0]
        assert page.evaluate("location.hash") == f"#feature={first['index']}"  # opens on the first feature
        assert_feature_shown(page, first)
        assert page.inner_text("#list-count") == f"{N_FEATURES} of {N_FEATURES} features"
        # Exactly one max-activating token marked per context.
        marks = page.eval_on_selector_all(
            "#top-examples .ctx", "ctxs => ctxs.map(c => c.querySelectorAll('.tok.max').length)"
        )
        assert marks == [1] * len(first["top_examples"])
        # Lazy DOM: only the rows on screen (plus a small overscan) and one feature's contexts exist.
        assert 10 < page.locator(".list-row").count() < 60
        n_contexts = len(first["top_examples"]) + sum(len(iv["examples"]) for iv in first["intervals"])
        assert page.locator(".ctx").count() == n_contexts
        # Histogram, logits, neighbours are drawn.
        assert page.locator("#histogram svg rect.bar").count() == sum(
            1 for c in first["histogram"]["counts"] if c
        )
        assert page.locator("#logits .vrow").count() == len(first["logits"]["top"]) + len(
            first["logits"]["bottom"]
        )
        assert page.locator("#nearest .vrow").count() == len(first["nearest"])
        assert "W_U" in page.inner_text("#logits")
        headings = page.eval_on_selector_all(
            "#intervals .interval-head .kind", "n => n.map(x => x.textContent)"
        )
        assert headings == [f"Quantile interval {k + 1}/10" for k in range(10)]
        mean, variance, colours = luminance_stats(page.screenshot())
        assert variance > 300 and colours > 50, (mean, variance, colours)
        assert_clean(record)


def test_hover_shows_the_activation(browser: Browser, dashboard_page: Path, decoded: dict[str, Any]) -> None:
    feature = decoded["features"][0]
    example = feature["top_examples"][0]
    peak = max(range(len(example["acts"])), key=lambda i: (example["acts"][i], -i))
    with browser.open(dashboard_page, ready=READY) as record:
        page = record.page
        page.hover("#top-examples .ctx >> nth=0 >> .tok.max")
        tip = page.locator("#tooltip")
        assert tip.is_visible()
        token_json, _, value = tip.inner_text().partition("  act ")
        assert json.loads(token_json) == example["tokens"][peak]
        assert float(value) == pytest.approx(example["acts"][peak], rel=1e-3)
        assert_clean(record)


def test_click_in_list_and_back_button(
    browser: Browser, dashboard_page: Path, decoded: dict[str, Any]
) -> None:
    by_index = {f["index"]: f for f in decoded["features"]}
    with browser.open(dashboard_page, ready=READY) as record:
        page = record.page
        page.click('.list-row[data-index="8"]')
        assert page.evaluate("location.hash") == "#feature=8"
        assert_feature_shown(page, by_index[8])
        assert page.locator('.list-row.selected[data-index="8"]').count() == 1
        page.click('.list-row[data-index="14"]')
        assert_feature_shown(page, by_index[14])
        page.go_back()
        assert_feature_shown(page, by_index[8])
        page.keyboard.press("j")  # next in list order
        assert_feature_shown(page, by_index[10])
        assert_clean(record)


def test_nearest_and_correlated_links_jump(
    browser: Browser, dashboard_page: Path, decoded: dict[str, Any]
) -> None:
    by_index = {f["index"]: f for f in decoded["features"]}
    source, target = next(
        (f, j) for f in decoded["features"] for j, _ in f["nearest"] if j in by_index and j != f["index"]
    )
    with browser.open(dashboard_page, f"feature={source['index']}", ready=READY) as record:
        page = record.page
        assert_feature_shown(page, source)
        # A neighbour that is not in the page is shown, without a link.
        absent = [j for j, _ in source["nearest"] if j not in by_index]
        assert page.locator("#nearest a.flink").count() == len(source["nearest"]) - len(absent)
        page.click(f'#nearest a[href="#feature={target}"]')
        assert_feature_shown(page, by_index[target])
        page.go_back()
        assert_feature_shown(page, source)
        corr_source, corr_target = next(
            (f, j)
            for f in decoded["features"]
            for j, _ in f["correlated"]
            if j in by_index and j != f["index"]
        )
        page.evaluate(f"location.hash = 'feature={corr_source['index']}'")
        assert_feature_shown(page, corr_source)
        page.click(f'#correlated a[href="#feature={corr_target}"]')
        assert_feature_shown(page, by_index[corr_target])
        assert_clean(record)


def test_open_on_hash(browser: Browser, dashboard_page: Path, decoded: dict[str, Any]) -> None:
    feature = decoded["features"][123]
    with browser.open(dashboard_page, f"feature={feature['index']}", ready=READY) as record:
        assert_feature_shown(record.page, feature)
        # The list scrolled to show the selected row.
        assert record.page.locator(f'.list-row.selected[data-index="{feature["index"]}"]').is_visible()
        assert_clean(record)
    with browser.open(dashboard_page, "feature=7", ready=READY) as record:  # odd indices are not in the page
        assert "Feature 7 is not in this dashboard" in record.page.inner_text("#feature-missing")
        assert_clean(record)


def _rounded_key(value: float) -> float:
    return float(f"{value:.3g}")


def test_sorting(browser: Browser, dashboard_page: Path, decoded: dict[str, Any]) -> None:
    features = decoded["features"]
    # Opened on the last feature, the list is scrolled to its row; a new order starts from the top.
    with browser.open(dashboard_page, f"feature={features[-1]['index']}", ready=READY) as record:
        page = record.page
        assert page.eval_on_selector("#feature-list", "v => v.scrollTop") > 0
        page.click('.list-head button[data-sort="maxAct"]')
        expected = [f["index"] for f in sorted(features, key=lambda f: (-f["max_act"], f["index"]))]
        assert visible_row_indices(page)[:20] == expected[:20]
        assert page.inner_text('.list-head button[data-sort="maxAct"]') == "Max act ▼"
        page.click('.list-head button[data-sort="maxAct"]')  # again: ascending
        assert (
            visible_row_indices(page)[:20]
            == [f["index"] for f in sorted(features, key=lambda f: (f["max_act"], f["index"]))][:20]
        )
        page.click('.list-head button[data-sort="density"]')
        assert (
            visible_row_indices(page)[:20]
            == [f["index"] for f in sorted(features, key=lambda f: (-f["density"], f["index"]))][:20]
        )
        # Scrolling the virtual list brings later rows into the DOM.
        page.eval_on_selector("#feature-list", "v => { v.scrollTop = 150 * 30; }")
        page.wait_for_timeout(100)
        rows = visible_row_indices(page)
        by_density = [f["index"] for f in sorted(features, key=lambda f: (-f["density"], f["index"]))]
        assert by_density[150] in rows and by_density[0] not in rows
        assert_clean(record)


def test_filtering(browser: Browser, dashboard_page: Path, decoded: dict[str, Any]) -> None:
    features = decoded["features"]
    with browser.open(dashboard_page, ready=READY) as record:
        page = record.page
        page.fill("#f-index", "10-20")
        assert page.inner_text("#list-count") == f"6 of {N_FEATURES} features"
        assert visible_row_indices(page) == [10, 12, 14, 16, 18, 20]
        page.fill("#f-index", "")
        page.fill("#f-dmin", "0.5")
        page.fill("#f-maxact", "3")
        expected = [f["index"] for f in features if f["density"] * 100 >= 0.5 and f["max_act"] >= 3]
        assert 0 < len(expected) < N_FEATURES
        assert page.inner_text("#list-count") == f"{len(expected)} of {N_FEATURES} features"
        assert visible_row_indices(page) == expected[: len(visible_row_indices(page))]
        page.click("text=Clear filters")
        assert page.inner_text("#list-count") == f"{N_FEATURES} of {N_FEATURES} features"
        # Text search over each feature's top tokens.
        term = top_tokens(features[40])[0].strip().lstrip("#").lower()
        expected = [f["index"] for f in features if any(term in t.lower() for t in top_tokens(f))]
        page.fill("#f-search", term.upper())  # case-insensitive
        assert page.inner_text("#list-count") == f"{len(expected)} of {N_FEATURES} features"
        assert features[40]["index"] in visible_row_indices(page)
        page.fill("#f-search", "no-such-token-anywhere")
        assert page.inner_text("#list-count") == f"0 of {N_FEATURES} features"
        assert "No feature matches" in page.inner_text("#feature-list")
        assert_clean(record)


def test_csp_blocks_a_request_and_reports_it(browser: Browser, dashboard_page: Path) -> None:
    with browser.open(dashboard_page, ready=READY) as record:
        page = record.page
        outcome = page.evaluate(
            "fetch('http://127.0.0.1:9/probe').then(() => 'fetched', (e) => 'blocked: ' + e.name)"
        )
        assert outcome.startswith("blocked")
        page.evaluate(
            "new Promise(r => { const i = new Image(); i.onerror = r; i.src = 'http://127.0.0.1:9/x.png'; document.body.appendChild(i); })"
        )
        page.wait_for_timeout(100)
        directives = {v["directive"] for v in record.csp_violations()}
        assert {"connect-src", "img-src"} <= directives
        assert any("Content Security Policy" in text for kind, text in record.console if kind == "error")


def test_prompt_view(browser: Browser, dashboard_page: Path, dashboard_data: dict[str, Any]) -> None:
    prompt = dashboard_data["prompt"]
    with browser.open(dashboard_page, "prompt", ready=READY) as record:
        page = record.page
        page.wait_for_selector("#prompt-view")
        assert page.locator("#prompt-table tbody tr").count() == len(prompt["tokens"])
        assert page.locator("#prompt-tokens .tok").count() == len(prompt["tokens"])
        page.click("#prompt-tokens .tok >> nth=3")
        assert page.locator("#prompt-table tbody tr >> nth=3").get_attribute("class") == "picked"
        row3 = page.inner_text("#prompt-table tbody tr >> nth=3")
        for feature, value in prompt["top_features"][3]:
            assert f"#{feature} {float(f'{value:.3g}'):g}" in row3
        feature = prompt["top_features"][3][0][0]
        page.click(f'#prompt-table a[href="#feature={feature}"]')
        page.wait_for_selector(f'#feature-view[data-index="{feature}"]')
        page.go_back()
        page.wait_for_selector("#prompt-view")
        assert_clean(record)


def test_equal_width_intervals_and_tied_embeddings(browser: Browser, tmp_path: Path) -> None:
    data = synthetic_dashboard_data(
        20, seed=5, interval_kind="equal_width", logit_source="tied_embeddings", with_prompt=False
    )
    path = write_dashboard_html(data, tmp_path / "minilm.html")
    with browser.open(path, ready=READY) as record:
        page = record.page
        assert page.inner_text("#intervals h2") == "Examples from equal-width intervals"
        kinds = page.eval_on_selector_all("#intervals .interval-head .kind", "n => n.map(x => x.textContent)")
        assert kinds == [f"Equal-width interval {k + 1}/10" for k in range(10)]
        assert not any("quantile" in k.lower() for k in kinds)
        ranges = page.eval_on_selector_all(
            "#intervals .interval-head .range", "n => n.map(x => x.textContent)"
        )
        top = data["features"][0]["intervals"][-1]
        low, high = (float(f"{top[key]:.3g}") for key in ("low", "high"))
        assert ranges[0] == f"[{low:g}, {high:g}]"
        logits = page.inner_text("#logits")
        assert page.inner_text("#logits h2") == "Token embedding alignment"
        assert "tied token embeddings" in logits and "MiniLM" in logits and "W_U" not in logits
        assert page.locator("#prompt-view").count() == 0 and page.locator("text=Prompt").count() == 0
        assert_clean(record)
    no_logits = synthetic_dashboard_data(3, seed=6, logit_source=None, with_prompt=False)
    path = write_dashboard_html(no_logits, tmp_path / "nologits.html")
    with browser.open(path, ready=READY) as record:
        assert "No logit effects" in record.page.inner_text("#logits")
        assert_clean(record)


# -- training report ------------------------------------------------------------------------------


def test_report_renders_charts_and_table(browser: Browser, report_dir: Path) -> None:
    with browser.open(report_dir / "report.html", width=1300, height=900) as record:
        page = record.page
        page.wait_for_load_state("load")
        charts = page.eval_on_selector_all(
            "svg.chart",
            """svgs => svgs.map(s => ({
                id: s.closest('section').id,
                paths: [...s.querySelectorAll('path.series')].filter(p => p.getAttribute('d').length > 10 && p.getTotalLength() > 20).length,
                bars: s.querySelectorAll('rect.bar').length,
                width: s.getBoundingClientRect().width}))""",
        )
        by_id = {c["id"]: c for c in charts}
        for chart_id in (
            "chart-losses",
            "chart-l0",
            "chart-ev",
            "chart-dead",
            "chart-lr",
            "chart-l1",
            "chart-throughput",
            "chart-scores",
        ):
            assert by_id[chart_id]["paths"] >= 1 and by_id[chart_id]["width"] > 300, by_id[chart_id]
        assert by_id["chart-losses"]["paths"] == 4
        assert by_id["density-train"]["bars"] > 2 and by_id["density-eval"]["bars"] > 2
        rows = page.eval_on_selector_all(
            "#eval-table tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))"
        )
        assert [r[0] for r in rows] == [
            "l0",
            "explained_variance",
            "mse",
            "dead_fraction",
            "ce_loss_score",
            "kl_div_score",
        ]
        assert rows[4][1] == "0.99"
        mean, variance, colours = luminance_stats(page.screenshot())
        assert variance > 100 and colours > 50, (mean, variance, colours)
        assert_clean(record)


def test_report_screenshot_not_blank_for_real_run(browser: Browser, tmp_path: Path) -> None:
    import shutil

    from sae_lens.html import write_training_report

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "minilm_topk_run", run)
    with browser.open(write_training_report(run)) as record:
        page = record.page
        assert page.locator("svg.chart path.series").count() >= 9
        assert math.isclose(
            float(page.inner_text("#eval-table tbody tr >> nth=3 >> td >> nth=1")), 0.8026, rel_tol=1e-3
        )
        assert_clean(record)
