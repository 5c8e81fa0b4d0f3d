"""Small, dependency-free SVG charts for the static training report.

Everything here returns SVG text that is inlined into a page. No `style="..."` attributes are
written (the pages' Content-Security-Policy forbids inline style attributes); colours and strokes
are SVG presentation attributes and the text styling comes from the page's stylesheet.

The tick maths is separate from the drawing so that it can be checked by hand:

- `nice_linear_ticks(0, 1)` → `[0, 0.2, 0.4, 0.6, 0.8, 1]` (steps of 1, 2, 2.5 or 5 × 10^k);
- `log_ticks(3e-4, 2)` → `[0.001, 0.01, 0.1, 1]` (decades; 2 and 5 multiples when few decades).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Colour-blind-friendly, distinguishable on white (a mix of Okabe–Ito and Tableau hues).
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")

_NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)
# A log y axis pays off once the values span a factor of 10 (a loss falling from 300 to 20).
LOG_AUTO_RATIO = 10.0


def nice_step(span: float, target_ticks: int = 5) -> float:
    """The 'nice' tick step (1, 2, 2.5 or 5 × 10^k) that divides `span` into about `target_ticks` parts."""
    if not math.isfinite(span) or span <= 0:
        return 1.0
    raw = span / max(1, target_ticks)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    residual = raw / magnitude
    # The smallest nice step at least as large as the raw one, so there are at most ~target_ticks ticks.
    for step in _NICE_STEPS:
        if residual <= step * (1 + 1e-9):
            return step * magnitude
    return 10.0 * magnitude


def _clean(value: float, step: float) -> float:
    """`value` rounded to the precision of `step`, so that 3 × 0.1 prints as 0.3 and not 0.30000000000000004."""
    decimals = max(0, -math.floor(math.log10(step)) + 2)
    cleaned = round(value, decimals)
    return 0.0 if cleaned == 0 else cleaned


def nice_domain(low: float, high: float, target_ticks: int = 5) -> tuple[float, float, float]:
    """(low', high', step): the domain widened outwards to whole multiples of a nice step.

    A degenerate domain (low == high) is widened around its value so a flat line still gets an axis.
    """
    if low > high:
        low, high = high, low
    if low == high:
        pad = abs(low) * 0.1 if low != 0 else 1.0
        low, high = low - pad, high + pad
    step = nice_step(high - low, target_ticks)
    return (
        _clean(math.floor(low / step + 1e-9) * step, step),
        _clean(math.ceil(high / step - 1e-9) * step, step),
        step,
    )


def ticks_in(start: float, stop: float, step: float) -> list[float]:
    """The whole multiples of `step` in [start, stop] (ends included, up to float error)."""
    first, last = math.ceil(start / step - 1e-9), math.floor(stop / step + 1e-9)
    return [_clean(k * step, step) for k in range(first, last + 1)]


def nice_linear_ticks(low: float, high: float, target_ticks: int = 5) -> list[float]:
    """Tick values at whole multiples of a nice step, covering [low, high] after widening to nice bounds."""
    start, stop, step = nice_domain(low, high, target_ticks)
    return ticks_in(start, stop, step)


def log_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """Ticks for a log axis over [low, high] (both > 0): powers of ten inside the domain.

    When the domain spans fewer than two decades the 2× and 5× multiples are added so the axis keeps
    at least a few labels; when it spans more decades than `max_ticks`, every n-th decade is kept.
    """
    if low <= 0 or high <= 0:
        raise ValueError(f"log axis needs a positive domain, got [{low}, {high}]")
    if low > high:
        low, high = high, low
    lo_exp, hi_exp = math.floor(math.log10(low) + 1e-9), math.ceil(math.log10(high) - 1e-9)
    tolerance = 1e-9
    inside = lambda v: low * (1 - tolerance) <= v <= high * (1 + tolerance)  # noqa: E731
    decades = [10.0**k for k in range(lo_exp, hi_exp + 1)]
    ticks = [v for v in decades if inside(v)]
    if len(ticks) < 3:
        multiples = [m * 10.0**k for k in range(lo_exp - 1, hi_exp + 1) for m in (1.0, 2.0, 5.0)]
        ticks = [v for v in multiples if inside(v)]
    if len(ticks) > max_ticks:
        every = math.ceil(len(ticks) / max_ticks)
        ticks = ticks[::every]
    return [float(f"{v:.6g}") for v in ticks]


def log_domain(low: float, high: float) -> tuple[float, float]:
    """The domain of a log axis: [low, high] padded by 5% of its width in log space on each side."""
    lo, hi = math.log10(low), math.log10(high)
    pad = max(0.05 * (hi - lo), 0.02)
    return 10.0 ** (lo - pad), 10.0 ** (hi + pad)


@dataclass(frozen=True)
class Scale:
    """Maps data values in [domain_low, domain_high] to pixels in [range_start, range_end] (linear or log10)."""

    domain_low: float
    domain_high: float
    range_start: float
    range_end: float
    log: bool = False

    def __call__(self, value: float) -> float:
        if self.log:
            low, high, v = math.log10(self.domain_low), math.log10(self.domain_high), math.log10(value)
        else:
            low, high, v = self.domain_low, self.domain_high, value
        fraction = (v - low) / (high - low) if high != low else 0.5
        return self.range_start + fraction * (self.range_end - self.range_start)


_SI = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))


def format_number(value: float, significant: int = 3) -> str:
    """A short human label: 1234567 → '1.23M', 0.000123 → '1.23e-4', 0.5 → '0.5', 20000 → '20k'."""
    if value is None or not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    for threshold, suffix in _SI:
        if magnitude >= threshold:
            return f"{value / threshold:.{significant}g}{suffix}"
    if magnitude < 1e-3:
        mantissa, exponent = f"{value:.{significant - 1}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{significant}g}"


def _decimals(step: float) -> int:
    """Decimals needed to print multiples of `step` exactly: 0.25 → 2, 0.2 → 1, 5 → 0."""
    decimals = 0
    while decimals < 8 and abs(round(step, decimals) - step) > abs(step) * 1e-6:
        decimals += 1
    return decimals


def axis_labels(ticks: Sequence[float], step: float) -> tuple[list[str], str]:
    """Labels for the ticks of a linear axis, in one format for the whole axis, and a unit note.

    Large values get an SI suffix (0, 50k, 100k); small ones a shared power of ten, returned as the
    note for the axis title (0.90, 0.95, 1.00 with "×1e-3"); others as many decimals as `step` needs.
    """
    biggest = max((abs(t) for t in ticks), default=0.0)
    if biggest == 0:
        return ["0" for _ in ticks], ""
    if biggest >= 1e4:
        unit, suffix = next((t, s) for t, s in _SI if biggest >= t)
        decimals = _decimals(step / unit)
        return [f"{t / unit:.{decimals}f}{suffix}" if t else "0" for t in ticks], ""
    if biggest < 1e-2:
        exponent = math.floor(math.log10(biggest))
        unit = 10.0**exponent
        decimals = _decimals(_clean(step / unit, step / unit))
        return [f"{t / unit:.{decimals}f}" if t else "0" for t in ticks], f"×1e{exponent}"
    decimals = _decimals(step)
    return [f"{t:.{decimals}f}" if t else "0" for t in ticks], ""


def format_tick(value: float, step: float | None = None) -> str:
    """One tick label; with the axis `step`, as many decimals as the step needs (0.25 → 2, 0.2 → 1)."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if step is None or magnitude >= 1e4 or magnitude < 1e-3:
        return format_number(value)
    return f"{value:.{_decimals(step)}f}"


@dataclass
class Series:
    """One line of a chart: `xs` and `ys` of equal length; a None or non-finite y breaks the line."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = PALETTE[0]
    dashed: bool = False
    markers: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _decimate(points: list[tuple[float, float]], buckets: int) -> list[tuple[float, float]]:
    """Keep the first, lowest, highest and last point of each x bucket: a long run stays a few kB of SVG
    while every spike that would be visible at this width is kept."""
    if len(points) <= 4 * buckets:
        return points
    x0, x1 = points[0][0], points[-1][0]
    width = (x1 - x0) / buckets or 1.0
    kept: list[tuple[float, float]] = []
    group: list[tuple[float, float]] = []
    current = None
    for point in [*points, (math.inf, 0.0)]:
        bucket = min(buckets - 1, int((point[0] - x0) / width)) if math.isfinite(point[0]) else None
        if bucket != current and group:
            chosen = {0, len(group) - 1}
            chosen.add(min(range(len(group)), key=lambda i: group[i][1]))
            chosen.add(max(range(len(group)), key=lambda i: group[i][1]))
            kept.extend(group[i] for i in sorted(chosen))
            group = []
        current = bucket
        group.append(point)
    return kept


def _text(x: float, y: float, content: str, css_class: str, anchor: str = "start", extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" class="{css_class}" text-anchor="{anchor}"{extra}>'
        f"{html.escape(content)}</text>"
    )


def line_chart(
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str = "",
    log_y: bool | str = "auto",
    x_from_zero: bool = True,
    width: int = 560,
    height: int = 280,
    chart_id: str = "",
) -> str:
    """An SVG line chart of `series` against a shared x axis.

    `log_y="auto"` uses a log y axis when every finite value is positive and they span a factor of at
    least `LOG_AUTO_RATIO` (a loss falling from 300 to 2); `True`/`False` force it. The x axis starts at
    0 when `x_from_zero` and the data are positive. Returns "" when no series has a finite point.
    """
    all_x: list[float] = []
    all_y: list[float] = []
    for s in series:
        for x, y in zip(s.xs, s.ys, strict=True):
            if _finite(x) and _finite(y):
                all_x.append(float(x))
                all_y.append(float(y))  # type: ignore[arg-type]
    if not all_y:
        return ""
    positive = all(y > 0 for y in all_y)
    if log_y == "auto":
        use_log = positive and max(all_y) / min(all_y) >= LOG_AUTO_RATIO
    else:
        use_log = bool(log_y) and positive

    margin_left, margin_right, margin_top, margin_bottom = 64, 16, 30, 44
    plot_w, plot_h = width - margin_left - margin_right, height - margin_top - margin_bottom
    x_low, x_high = min(all_x), max(all_x)
    if x_from_zero and x_low > 0:
        x_low = 0.0  # tokens and steps count from zero: the start of training is part of the picture
    if x_low == x_high:
        x_low, x_high = x_low - 1, x_high + 1
    x_step = nice_step(x_high - x_low, 5)
    x_ticks = ticks_in(x_low, x_high, x_step)
    x_scale = Scale(x_low, x_high, margin_left, margin_left + plot_w)

    note = ""
    if use_log:
        y_low, y_high = log_domain(min(all_y), max(all_y))
        y_ticks = log_ticks(y_low, y_high)
        y_labels = [format_number(t) for t in y_ticks]
    else:
        y_low, y_high, y_step = nice_domain(min(all_y), max(all_y), 5)
        y_ticks = ticks_in(y_low, y_high, y_step)
        y_labels, note = axis_labels(y_ticks, y_step)
    y_scale = Scale(y_low, y_high, margin_top + plot_h, margin_top, log=use_log)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{html.escape(y_label or x_label)}"'
        + (f' id="{html.escape(chart_id)}"' if chart_id else "")
        + f' data-log-y="{str(use_log).lower()}">'
    ]
    parts.append(
        f'<rect x="{margin_left}" y="{margin_top}" width="{plot_w}" height="{plot_h}" class="plot-bg"/>'
    )
    for tick, label in zip(y_ticks, y_labels, strict=True):
        y = y_scale(tick)
        parts.append(
            f'<line x1="{margin_left}" x2="{margin_left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        parts.append(_text(margin_left - 6, y + 4, label, "tick", "end"))
    x_labels, x_note = axis_labels(x_ticks, x_step)
    for tick, label in zip(x_ticks, x_labels, strict=True):
        x = x_scale(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{margin_top}" y2="{margin_top + plot_h}" class="grid"/>'
        )
        parts.append(_text(x, margin_top + plot_h + 16, label, "tick", "middle"))
    parts.append(
        f'<rect x="{margin_left}" y="{margin_top}" width="{plot_w}" height="{plot_h}" class="plot-frame"/>'
    )
    x_title = f"{x_label} ({x_note})" if x_note else x_label
    parts.append(_text(margin_left + plot_w / 2, height - 8, x_title, "axis-label", "middle"))
    if y_label:
        cy = margin_top + plot_h / 2
        y_title = y_label + (" (log scale)" if use_log else f" ({note})" if note else "")
        parts.append(_text(13, cy, y_title, "axis-label", "middle", f' transform="rotate(-90 13 {cy:.1f})"'))

    legend_x = float(margin_left)
    for s in series:
        segments: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(s.xs, s.ys, strict=True):
            if _finite(x) and _finite(y) and (not use_log or y > 0):  # type: ignore[operator]
                segments[-1].append((float(x), float(y)))  # type: ignore[arg-type]
            elif segments[-1]:
                segments.append([])
        segments = [seg for seg in segments if seg]
        if not segments:
            continue
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        path = []
        for seg in segments:
            seg = _decimate(seg, plot_w)
            coords = [f"{x_scale(x):.1f} {y_scale(y):.1f}" for x, y in seg]
            path.append("M" + " L".join(coords))
        parts.append(
            f'<path d="{" ".join(path)}" fill="none" stroke="{s.color}" stroke-width="1.8"'
            f' stroke-linejoin="round" class="series"{dash} data-name="{html.escape(s.name)}">'
            f"<title>{html.escape(s.name)}</title></path>"
        )
        if s.markers or sum(len(seg) for seg in segments) <= 3:
            for seg in segments:
                for x, y in seg:
                    parts.append(
                        f'<circle cx="{x_scale(x):.1f}" cy="{y_scale(y):.1f}" r="3" fill="{s.color}">'
                        f"<title>{html.escape(s.name)}: {format_number(y, 4)}</title></circle>"
                    )
        last = segments[-1][-1][1]
        label = f"{s.name} {format_number(last, 3)}"
        parts.append(
            f'<line x1="{legend_x:.1f}" x2="{legend_x + 16:.1f}" y1="14" y2="14" stroke="{s.color}" stroke-width="2.5"{dash}/>'
        )
        parts.append(_text(legend_x + 20, 18, label, "legend"))
        legend_x += 28 + 6.6 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    x_label: str,
    y_label: str = "count",
    width: int = 560,
    height: int = 260,
    color: str = PALETTE[0],
) -> str:
    """An SVG histogram: `counts[i]` drawn over [edges[i], edges[i + 1]] (len(edges) == len(counts) + 1)."""
    if len(edges) != len(counts) + 1 or not counts:
        raise ValueError(
            f"histogram needs len(edges) == len(counts) + 1 > 1; got {len(edges)} and {len(counts)}"
        )
    margin_left, margin_right, margin_top, margin_bottom = 62, 16, 14, 44
    plot_w, plot_h = width - margin_left - margin_right, height - margin_top - margin_bottom
    x_low, x_high = float(edges[0]), float(edges[-1])
    if x_low == x_high:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    x_scale = Scale(x_low, x_high, margin_left, margin_left + plot_w)
    _, y_high, y_step = nice_domain(0, max(max(counts), 1), 4)
    y_scale = Scale(0, y_high, margin_top + plot_h, margin_top)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{html.escape(x_label)}">',
        f'<rect x="{margin_left}" y="{margin_top}" width="{plot_w}" height="{plot_h}" class="plot-bg"/>',
    ]
    y_ticks = ticks_in(0, y_high, y_step)
    for tick, label in zip(y_ticks, axis_labels(y_ticks, y_step)[0], strict=True):
        y = y_scale(tick)
        parts.append(
            f'<line x1="{margin_left}" x2="{margin_left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        parts.append(_text(margin_left - 6, y + 4, label, "tick", "end"))
    x_step = nice_step(x_high - x_low, 6)
    x_ticks = ticks_in(x_low, x_high, x_step)
    for tick, label in zip(x_ticks, axis_labels(x_ticks, x_step)[0], strict=True):
        x = x_scale(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{margin_top + plot_h}" y2="{margin_top + plot_h + 4}" class="axis"/>'
        )
        parts.append(_text(x, margin_top + plot_h + 17, label, "tick", "middle"))
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        left, right = x_scale(edges[i]), x_scale(edges[i + 1])
        top = y_scale(count)
        parts.append(
            f'<rect x="{left + 0.5:.1f}" y="{top:.1f}" width="{max(right - left - 1, 0.8):.1f}" '
            f'height="{margin_top + plot_h - top:.1f}" fill="{color}" class="bar">'
            f"<title>[{format_number(edges[i], 3)}, {format_number(edges[i + 1], 3)}): {count}</title></rect>"
        )
    parts.append(
        f'<line x1="{margin_left}" x2="{margin_left + plot_w}" y1="{margin_top + plot_h}" '
        f'y2="{margin_top + plot_h}" class="axis"/>'
    )
    parts.append(_text(margin_left + plot_w / 2, height - 8, x_label, "axis-label", "middle"))
    cy = margin_top + plot_h / 2
    parts.append(_text(14, cy, y_label, "axis-label", "middle", f' transform="rotate(-90 14 {cy:.1f})"'))
    parts.append("</svg>")
    return "".join(parts)
