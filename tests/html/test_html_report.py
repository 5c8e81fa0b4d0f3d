"""The training report without a browser: what it reads from metrics.jsonl and what it draws."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from synthetic_metrics import BATCH_TOKENS, standard_run_rows, write_metrics

from sae_lens.errors import SAELensError
from sae_lens.html import write_training_report
from sae_lens.html.report import TokenAxis, read_metrics

REAL_RUN = Path(__file__).parent / "data" / "minilm_topk_run"


def must_search(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    match = re.search(pattern, text, flags)
    assert match is not None, f"{pattern!r} not found"
    return match


def _card(page: str, card_id: str) -> str:
    match = must_search(rf'<section class="card[^"]*" id="{card_id}"[^>]*>(.*?)</section>', page, flags=re.S)
    return match.group(1)


def _series_names(card: str) -> list[str]:
    return re.findall(r'class="series"(?: stroke-dasharray="[^"]+")? data-name="([^"]+)"', card)


def test_standard_run_report(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    page = write_training_report(tmp_path).read_text()
    losses = _card(page, "chart-losses")
    # aux_loss is zero at every step: named, not drawn. losses/* keys are loss curves too.
    assert _series_names(losses) == ["loss", "mse_loss", "l1_loss", "losses/orthogonality"]
    assert "Zero throughout, not drawn: aux_loss." in losses
    assert 'data-log-y="true"' in losses  # mse falls from ~400 to ~4
    # The null loss at step 50 breaks the loss line into two pieces.
    loss_path = must_search(r'<path d="([^"]+)"[^>]*data-name="loss"', losses).group(1)
    assert loss_path.count("M") == 2
    ev = _card(page, "chart-ev")
    assert (
        _series_names(ev) == ["explained_variance", "eval/explained_variance"] and 'data-log-y="false"' in ev
    )
    assert 'data-log-y="false"' in _card(page, "chart-lr")
    assert _series_names(_card(page, "chart-scores")) == ["eval/ce_loss_score", "eval/kl_div_score"]
    for card_id in ("chart-l0", "chart-dead", "chart-l1", "chart-throughput"):
        assert "<path d=" in _card(page, card_id)


def test_density_histograms_are_the_last_logged(tmp_path: Path) -> None:
    rows = standard_run_rows(n_steps=400)
    write_metrics(tmp_path, rows)
    page = write_training_report(tmp_path).read_text()
    train = _card(page, "density-train")
    assert "step 400: 2,048 latents" in train
    dead = int(2048 * 0.3)  # the last training histogram, at progress 1.0
    assert f"Never fired (at -10): {dead:,} ({dead / 2048:.1%})" in train
    last_counts = [r["log10_feature_density"]["counts"] for r in rows if "log10_feature_density" in r][-1]
    assert train.count('class="bar"') == sum(1 for c in last_counts if c) > 2  # one bar per non-empty bin
    assert "step 400" in _card(page, "density-eval")


def test_eval_table_is_the_last_eval_row(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    page = write_training_report(tmp_path).read_text()
    table = _card(page, "eval")
    cells = dict(re.findall(r'<td class="mono">([^<]+)</td><td class="num">([^<]+)</td>', table))
    # The final eval-only row (no tokens key) is the last one; its scores are 0.99 and 0.98.
    assert cells["ce_loss_score"] == "0.99" and cells["kl_div_score"] == "0.98"
    assert list(cells) == [
        "l0",
        "explained_variance",
        "mse",
        "dead_fraction",
        "ce_loss_score",
        "kl_div_score",
    ]
    assert f"step 400 · {400 * BATCH_TOKENS / 1e6:.3g}M tokens" in table


def test_token_axis_fills_in_eval_rows() -> None:
    axis = TokenAxis([{"step": 10, "tokens": 1000}, {"step": 20, "tokens": 2000}, {"step": 20, "eval/l0": 3}])
    assert axis(20) == 2000 and axis(15) == 1500 and axis(30) == 3000  # interpolated and extrapolated
    assert axis.label == "tokens trained"
    no_tokens = TokenAxis([{"step": 5, "loss": 1.0}])
    assert no_tokens(5) == 5 and no_tokens.label == "step"


def test_missing_or_empty_metrics_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SAELensError, match=r"no training metrics at .*metrics\.jsonl") as caught:
        write_training_report(tmp_path)
    assert "\n" not in str(caught.value)
    (tmp_path / "metrics.jsonl").write_text("\n  \n")
    with pytest.raises(SAELensError, match="holds no metrics yet") as caught:
        write_training_report(tmp_path)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "report.html").exists()


def test_half_written_last_line_is_skipped_and_noted(tmp_path: Path) -> None:
    path = write_metrics(tmp_path, standard_run_rows(n_steps=100))
    with path.open("a") as handle:
        handle.write('{"step": 101, "loss": 3.')  # a run still writing
    metrics = read_metrics(path)
    assert metrics.skipped_lines == 1
    page = write_training_report(tmp_path).read_text()
    assert "1 line(s) of metrics.jsonl were not JSON objects and were skipped." in page


def test_report_is_atomic_and_script_free(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    first = write_training_report(tmp_path)
    inode = first.stat().st_ino
    second = write_training_report(tmp_path)
    assert first == second == tmp_path / "report.html" and second.stat().st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "report.html"]
    page = second.read_text()
    assert "<script" not in page
    csp = must_search(r'Content-Security-Policy" content="([^"]+)"', page).group(1).replace("&#x27;", "'")
    assert csp.startswith("default-src 'none';") and "script-src 'none'" in csp and "img-src data:" in csp
    assert ' style="' not in page


def test_real_minilm_topk_run(tmp_path: Path) -> None:
    """metrics.jsonl and cfg.json from `sae-lens train` on all-MiniLM-L6-v2 (TopK, k=32, 200k tokens)."""
    run = tmp_path / REAL_RUN.name
    shutil.copytree(REAL_RUN, run)
    page = write_training_report(run).read_text()
    assert "<b>topk</b>" in page and "<b>sentence-transformers/all-MiniLM-L6-v2</b>" in page
    losses = _card(page, "chart-losses")
    assert _series_names(losses) == ["loss", "mse_loss"] and "not drawn: l1_loss, aux_loss." in losses
    last_eval = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval/l0"' in line
    ][-1]
    table = _card(page, "eval")
    assert f"{last_eval['eval/embedding_cosine_score']:.4g}" in table
    assert "Never fired (at -10): 175 (2.8%)" in _card(page, "density-eval")
