"""The SVG chart maths, checked against values worked out by hand."""

from __future__ import annotations

import math
import re

import pytest

from sae_lens.html.svg import (
    Scale,
    Series,
    _decimate,
    axis_labels,
    bar_chart,
    format_number,
    line_chart,
    log_domain,
    log_ticks,
    nice_domain,
    nice_linear_ticks,
    nice_step,
    ticks_in,
)


def must_search(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    match = re.search(pattern, text, flags)
    assert match is not None, f"{pattern!r} not found"
    return match


@pytest.mark.parametrize(
    ("span", "target", "expected"),
    [
        (1.0, 5, 0.2),  # raw 0.2 → 2 × 0.1
        (0.467, 5, 0.1),  # raw 0.0934 → residual 9.34 → 10 × 0.01
        (200_000, 5, 50_000),  # raw 40k → residual 4 → 5 × 10k
        (12.0, 5, 2.5),  # raw 2.4 → 2.5
        (7.0, 7, 1.0),
        (3.0e-4, 5, 1e-4),  # raw 6e-5 → residual 6 → 10 × 1e-5
    ],
)
def test_nice_step_by_hand(span: float, target: int, expected: float) -> None:
    assert nice_step(span, target) == pytest.approx(expected)


def test_nice_domain_widens_to_whole_steps() -> None:
    assert nice_domain(0.336, 0.803) == (0.3, 0.9, pytest.approx(0.1))
    assert nice_domain(5120, 199_680) == (0.0, 200_000.0, 50_000.0)
    low, high, step = nice_domain(3.0, 3.0)  # flat line: widened by 10% around the value
    assert (low, high) == pytest.approx((2.6, 3.4)) and step == pytest.approx(0.2)


def test_linear_ticks_are_clean_multiples() -> None:
    assert nice_linear_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_linear_ticks(0.13, 0.87) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    # 0.1 × 3 would print 0.30000000000000004 without cleaning.
    assert ticks_in(0.3, 0.9, 0.1) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert ticks_in(0.05, 0.26, 0.1) == [0.1, 0.2]


def test_log_ticks_by_hand() -> None:
    assert log_ticks(3e-4, 2) == [0.001, 0.01, 0.1, 1.0]
    # Under two decades inside: the 2× and 5× multiples join in.
    assert log_ticks(0.5, 30) == [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    # Eleven decades are thinned to every second one so at most 8 remain.
    assert log_ticks(1e-10, 1) == [1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0]
    with pytest.raises(ValueError):
        log_ticks(0, 1)


def test_log_domain_pads_five_percent_of_the_decades() -> None:
    low, high = log_domain(1.0, 100.0)  # 2 decades → 0.1 decade of padding each side
    assert math.log10(low) == pytest.approx(-0.1) and math.log10(high) == pytest.approx(2.1)


def test_scale_linear_and_log() -> None:
    linear = Scale(0, 10, 100, 200)
    assert linear(0) == 100 and linear(10) == 200 and linear(2.5) == 125
    inverted = Scale(0, 1, 300, 100)  # SVG y grows downwards
    assert inverted(0.25) == 250
    log = Scale(1, 1000, 0, 300, log=True)
    assert (
        log(10) == pytest.approx(100) and log(100) == pytest.approx(200) and log(1000) == pytest.approx(300)
    )


def test_axis_labels_pick_one_format_per_axis() -> None:
    assert axis_labels(ticks_in(0, 200_000, 50_000), 50_000) == (["0", "50k", "100k", "150k", "200k"], "")
    assert axis_labels([0.9e-3, 0.95e-3, 1e-3, 1.05e-3, 1.1e-3], 5e-5) == (
        ["0.90", "0.95", "1.00", "1.05", "1.10"],
        "×1e-3",
    )
    assert axis_labels([0, 0.25, 0.5], 0.25) == (["0", "0.25", "0.50"], "")
    assert axis_labels([0, 0, 0], 1) == (["0", "0", "0"], "")


def test_format_number() -> None:
    assert format_number(1_234_567) == "1.23M"
    assert format_number(0.000123) == "1.23e-4"
    assert format_number(20_000) == "20k"
    assert format_number(0.5) == "0.5"
    assert format_number(float("nan")) == "–"


def _path_points(svg: str) -> list[tuple[float, float]]:
    d = must_search(r'<path d="([^"]+)"', svg).group(1)
    return [(float(x), float(y)) for x, y in re.findall(r"([\d.]+) ([\d.]+)", d)]


def test_line_chart_puts_points_where_the_scales_say() -> None:
    # width 560, height 280, margins left 64, right 16, top 30, bottom 44 → plot x 64..544, y 30..236.
    svg = line_chart([Series("a", [0, 100], [0.0, 1.0])], x_label="tokens", log_y=False)
    assert _path_points(svg) == [(64.0, 236.0), (544.0, 30.0)]
    assert 'data-log-y="false"' in svg and ">tokens<" in svg


def test_line_chart_auto_log_and_gaps() -> None:
    # 1000 → 1 spans 1000x: log axis. The None breaks the line into two segments; x starts at 0.
    svg = line_chart([Series("loss", [10, 20, 30, 40], [1000.0, None, 10.0, 1.0])], x_label="step")
    assert 'data-log-y="true"' in svg
    d = must_search(r'<path d="([^"]+)"', svg).group(1)
    assert d.count("M") == 2
    x_of_10 = 64 + 10 / 40 * 480
    assert _path_points(svg)[0][0] == pytest.approx(x_of_10, abs=0.05)
    # A factor of 3 stays linear.
    assert 'data-log-y="false"' in line_chart([Series("l", [0, 1], [3.0, 1.0])], x_label="step")
    assert line_chart([Series("empty", [1, 2], [None, None])], x_label="step") == ""


def test_decimation_keeps_extremes() -> None:
    points = [(float(i), math.sin(i / 50) + (5.0 if i == 777 else 0.0)) for i in range(10_000)]
    kept = _decimate(points, 100)
    assert len(kept) <= 4 * 100 + 4 and kept[0] == points[0] and kept[-1] == points[-1]
    assert max(y for _, y in kept) == max(y for _, y in points)  # the spike survives
    assert min(y for _, y in kept) == min(y for _, y in points)


def test_bar_chart_bars_and_validation() -> None:
    svg = bar_chart([0, 1, 2, 3], [4, 0, 8], x_label="x")
    assert svg.count('class="bar"') == 2  # the empty bin draws nothing
    with pytest.raises(ValueError, match="len\\(edges\\) == len\\(counts\\) \\+ 1"):
        bar_chart([0, 1], [1, 2], x_label="x")
