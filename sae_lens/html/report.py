"""The training report: `output_dir/metrics.jsonl` in, `output_dir/report.html` out.

`metrics.jsonl` holds one JSON object per line, as `sae_lens.metrics_logger.MetricsLogger` writes it:

- scalar rows `{"step": 10, "loss": .., "mse_loss": .., "l0": .., "tokens": .., "eval/l0": .., ...}`,
  with non-finite values written as null; any `losses/<name>` key is one more loss term;
- histogram rows `{"step": 200, "log10_feature_density": {"min": .., "max": .., "counts": [...]}}`
  (and `eval/log10_feature_density`), bins of equal width between min and max.

The page is static: inline SVG charts from `sae_lens.html.svg`, a stylesheet allowed by its hash, no
script at all, and the same no-network Content-Security-Policy as the dashboards.
"""

from __future__ import annotations

import bisect
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_lens.errors import SAELensError
from sae_lens.html.page import atomic_write_text, html_page, read_asset
from sae_lens.html.svg import PALETTE, Series, bar_chart, format_number, line_chart

LOSS_KEYS = ("loss", "mse_loss", "l1_loss", "aux_loss")
DENSITY_HISTOGRAMS = (
    ("log10_feature_density", "Training window"),
    ("eval/log10_feature_density", "Held-out evaluation"),
)
# log10(density + 1e-10) puts latents that never fired at -10; anything below this is "dead".
DEAD_LOG10_DENSITY = -9.0


@dataclass
class Metrics:
    """The parsed contents of a metrics.jsonl file."""

    scalars: list[dict[str, Any]] = field(default_factory=list)  # rows in file order, scalar values only
    histograms: dict[str, list[tuple[int, dict[str, Any]]]] = field(
        default_factory=dict
    )  # name -> [(step, hist)]
    skipped_lines: int = 0


def read_metrics(path: Path) -> Metrics:
    """Parse `path`; a line that is not a JSON object (say, half-written by a running job) is skipped."""
    if not path.is_file():
        raise SAELensError(f"no training metrics at {path}: pass the run folder that holds metrics.jsonl")
    metrics = Metrics()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                metrics.skipped_lines += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                metrics.skipped_lines += 1
                continue
            step = int(row["step"])
            scalars: dict[str, Any] = {"step": step}
            for key, value in row.items():
                if key == "step":
                    continue
                if isinstance(value, dict) and isinstance(value.get("counts"), list):
                    metrics.histograms.setdefault(key, []).append((step, value))
                elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                    scalars[key] = None if value is None or not math.isfinite(value) else float(value)
            if len(scalars) > 1:
                metrics.scalars.append(scalars)
    if not metrics.scalars and not metrics.histograms:
        raise SAELensError(f"{path} holds no metrics yet: let the training log at least one step, then retry")
    return metrics


class TokenAxis:
    """Maps a step to tokens trained, from the rows that log both; eval-only rows carry no `tokens`."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        known: dict[int, float] = {}
        for row in rows:
            if row.get("tokens") is not None:
                known[row["step"]] = row["tokens"]
        self.steps = sorted(known)
        self.tokens = [known[s] for s in self.steps]
        self.uses_tokens = bool(self.steps)

    def __call__(self, step: int) -> float:
        if not self.uses_tokens:
            return float(step)
        if len(self.steps) == 1:
            only_step, only_tokens = self.steps[0], self.tokens[0]
            return only_tokens * step / only_step if only_step else only_tokens
        i = bisect.bisect_left(self.steps, step)
        if i < len(self.steps) and self.steps[i] == step:
            return self.tokens[i]
        # Interpolate (or extrapolate at the ends) linearly: a run's batch size is constant.
        i = min(max(i, 1), len(self.steps) - 1)
        s0, s1, t0, t1 = self.steps[i - 1], self.steps[i], self.tokens[i - 1], self.tokens[i]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    @property
    def label(self) -> str:
        return "tokens trained" if self.uses_tokens else "step"


def _series(rows: list[dict[str, Any]], key: str, axis: TokenAxis, **style: Any) -> Series | None:
    points = [(axis(row["step"]), row[key]) for row in rows if key in row]
    if not any(y is not None for _, y in points):
        return None
    return Series(name=key, xs=[p[0] for p in points], ys=[p[1] for p in points], **style)


def _chart_card(title: str, caption: str, svg: str, card_id: str) -> str:
    if not svg:
        return ""
    return (
        f'<section class="card chart-card" id="{card_id}"><h2>{html.escape(title)}</h2>'
        f'<p class="caption">{html.escape(caption)}</p>{svg}</section>'
    )


def _line_card(
    rows: list[dict[str, Any]],
    axis: TokenAxis,
    card_id: str,
    title: str,
    caption: str,
    keys: list[str],
    *,
    eval_keys: tuple[str, ...] = (),
    log_y: bool | str = "auto",
    y_label: str = "",
) -> str:
    series = []
    for i, key in enumerate(keys):
        s = _series(rows, key, axis, color=PALETTE[i % len(PALETTE)])
        if s is not None:
            series.append(s)
    for i, key in enumerate(eval_keys):
        s = _series(rows, key, axis, color=PALETTE[(len(keys) + i) % len(PALETTE)], dashed=True, markers=True)
        if s is not None:
            series.append(s)
    svg = line_chart(series, x_label=axis.label, y_label=y_label, log_y=log_y, chart_id=f"{card_id}-svg")
    return _chart_card(title, caption, svg, card_id)


def _loss_card(rows: list[dict[str, Any]], axis: TokenAxis) -> str:
    extra = sorted({key for row in rows for key in row if key.startswith("losses/")})
    keys = [key for key in (*LOSS_KEYS, *extra) if any(key in row for row in rows)]
    # A term that is zero at every step (l1 for TopK, aux without dead latents) would only squash the
    # axis and cannot be drawn on a log scale at all: name it in the caption instead.
    flat = [key for key in keys if all(not row.get(key) for row in rows if key in row)]
    drawn = [key for key in keys if key not in flat]
    caption = "Training loss terms per logged step."
    if flat:
        caption += f" Zero throughout, not drawn: {', '.join(flat)}."
    return _line_card(rows, axis, "chart-losses", "Loss terms", caption, drawn, y_label="loss")


def _density_cards(metrics: Metrics) -> list[str]:
    """One card per density histogram name (training window, held-out eval): the last one logged."""
    cards = []
    for name, label in DENSITY_HISTOGRAMS:
        logged = metrics.histograms.get(name)
        if not logged:
            continue
        step, hist = logged[-1]
        counts = [int(c) for c in hist["counts"]]
        if not counts:
            continue
        low = float(hist["min"])
        high = float(hist["max"])
        # The logger's histc widens a degenerate range to [min, min + 1].
        high = high if high > low else low + 1.0
        width = (high - low) / len(counts)
        edges = [low + i * width for i in range(len(counts) + 1)]
        total = sum(counts)
        dead = sum(c for i, c in enumerate(counts) if edges[i + 1] <= DEAD_LOG10_DENSITY)
        svg = bar_chart(edges, counts, x_label="log10(feature density)", y_label="latents")
        caption = f"{label}, step {step:,}: {total:,} latents, log10(density + 1e-10)."
        if total:
            caption += f" Never fired (at -10): {dead:,} ({dead / total:.1%})."
        card_id = "density-eval" if name.startswith("eval/") else "density-train"
        cards.append(
            f'<section class="card chart-card hist" id="{card_id}" data-name="{html.escape(name)}">'
            f"<h2>Feature density: {html.escape(label.lower())}</h2>"
            f'<p class="caption">{html.escape(caption)}</p>{svg}</section>'
        )
    return cards


def _eval_table(rows: list[dict[str, Any]], axis: TokenAxis) -> str:
    last = next((row for row in reversed(rows) if any(k.startswith("eval/") for k in row)), None)
    if last is None:
        return (
            '<section class="card" id="eval"><h2>Final evaluation</h2>'
            '<p class="empty">No eval/ metrics were logged in this run.</p></section>'
        )
    body = "".join(
        f'<tr><td class="mono">{html.escape(key[len("eval/") :])}</td>'
        f'<td class="num">{html.escape(_format_value(value))}</td></tr>'
        for key, value in last.items()
        if key.startswith("eval/")
    )
    where = f"step {last['step']:,}" + (
        f" · {format_number(axis(last['step']))} tokens" if axis.uses_tokens else ""
    )
    return (
        f'<section class="card" id="eval"><h2>Final evaluation</h2><p class="caption">Last row with eval/ metrics: {where}.</p>'
        f'<table class="data" id="eval-table"><thead><tr><th>metric</th><th class="num">value</th></tr></thead>'
        f"<tbody>{body}</tbody></table></section>"
    )


def _format_value(value: float | None) -> str:
    if value is None:
        return "null (non-finite)"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3e}"


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((row[key] for row in reversed(rows) if row.get(key) is not None), None)


def _summary(rows: list[dict[str, Any]], axis: TokenAxis) -> str:
    train_rows = [row for row in rows if "loss" in row or "tokens" in row]
    cards = [
        ("Steps", _last(rows, "step"), "{:,.0f}"),
        ("Tokens trained", _last(rows, "tokens"), None),
        ("Final loss", _last(train_rows, "loss"), None),
        ("L0", _last(train_rows, "l0"), None),
        ("Explained variance", _last(train_rows, "explained_variance"), "{:.3f}"),
        ("Dead fraction", _last(train_rows, "dead_fraction"), "{:.1%}"),
        ("Tokens / s", _last(train_rows, "tokens_per_second"), None),
    ]
    out = []
    for label, value, pattern in cards:
        if value is None:
            continue
        text = pattern.format(value) if pattern else format_number(value, 3)
        out.append(f'<div class="stat"><div class="label">{label}</div><div class="value">{text}</div></div>')
    return f'<div class="stats" id="summary">{"".join(out)}</div>'


def _run_description(output_dir: Path) -> str:
    cfg_path = output_dir / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(cfg, dict):
        return ""
    metadata = cfg.get("metadata")
    meta: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
    fields = [
        ("architecture", cfg.get("architecture")),
        ("d_in", cfg.get("d_in")),
        ("d_sae", cfg.get("d_sae")),
        ("k", cfg.get("k")),
        ("model", meta.get("model_name")),
        ("hook", meta.get("hook_name")),
        ("dataset", meta.get("dataset_path")),
    ]
    pills = "".join(
        f"<span>{html.escape(name)} <b>{html.escape(str(value))}</b></span>"
        for name, value in fields
        if value is not None
    )
    return f'<div class="meta">{pills}</div>'


def render_training_report(output_dir: Path, metrics: Metrics) -> str:
    """The report page's HTML for the parsed `metrics` of the run in `output_dir`."""
    rows = metrics.scalars
    axis = TokenAxis(rows)
    score_keys = sorted({k for row in rows for k in row if k.startswith("eval/") and k.endswith("_score")})
    cards = [
        _loss_card(rows, axis),
        _line_card(
            rows,
            axis,
            "chart-l0",
            "L0",
            "Mean number of active latents per token (dashed: held-out eval).",
            ["l0"],
            eval_keys=("eval/l0",),
            y_label="L0",
        ),
        _line_card(
            rows,
            axis,
            "chart-ev",
            "Explained variance",
            "1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² on training batches (dashed: held-out eval).",
            ["explained_variance"],
            eval_keys=("eval/explained_variance",),
            log_y=False,
            y_label="EV",
        ),
        _line_card(
            rows,
            axis,
            "chart-dead",
            "Dead fraction",
            "Fraction of latents that have not fired within the dead-latent window.",
            ["dead_fraction"],
            eval_keys=("eval/dead_fraction",),
            log_y=False,
            y_label="fraction",
        ),
        _line_card(
            rows,
            axis,
            "chart-lr",
            "Learning rate",
            "Optimiser learning rate after the schedule.",
            ["lr"],
            log_y=False,
            y_label="lr",
        ),
        _line_card(
            rows,
            axis,
            "chart-l1",
            "Sparsity coefficient",
            "L1 coefficient after its warm-up.",
            ["l1_coefficient"],
            log_y=False,
            y_label="coefficient",
        ),
        _line_card(
            rows,
            axis,
            "chart-throughput",
            "Throughput",
            "Training tokens per second, averaged since the start.",
            ["tokens_per_second"],
            log_y=False,
            y_label="tokens / s",
        ),
        _line_card(
            rows,
            axis,
            "chart-scores",
            "Downstream scores",
            "Held-out eval scores (1 = as good as the clean model).",
            [],
            eval_keys=tuple(score_keys),
            log_y=False,
            y_label="score",
        )
        if score_keys
        else "",
    ]
    cards += _density_cards(metrics)
    cards.append(_eval_table(rows, axis))
    skipped = (
        f'<p class="note">{metrics.skipped_lines} line(s) of metrics.jsonl were not JSON objects and were skipped.</p>'
        if metrics.skipped_lines
        else ""
    )
    body = (
        f'<header class="topbar"><div class="brand">Training report</div>'
        f'<div class="run mono">{html.escape(output_dir.name)}</div>{_run_description(output_dir)}</header>'
        f'<main class="report">{_summary(rows, axis)}{skipped}'
        f'<div class="charts">{"".join(card for card in cards if card)}</div>'
        f'<footer class="faint">Written by sae_lens from {html.escape(str(output_dir / "metrics.jsonl"))}; '
        f"{len(rows):,} metric rows. Works offline: no script, no network request.</footer></main>"
    )
    return html_page(
        f"Training report · {output_dir.name}",
        body,
        styles=[read_asset("common.css"), read_asset("report.css")],
    )


def write_training_report(output_dir: str | Path) -> Path:
    """Read `output_dir/metrics.jsonl` and write `output_dir/report.html` atomically; returns its path.

    Raises `SAELensError` (one line) when metrics.jsonl is missing or holds no metrics.
    """
    output_dir = Path(output_dir)
    metrics = read_metrics(output_dir / "metrics.jsonl")
    return atomic_write_text(output_dir / "report.html", render_training_report(output_dir, metrics))
