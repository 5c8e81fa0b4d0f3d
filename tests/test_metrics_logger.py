"""MetricsLogger (sae_lens/metrics_logger.py): one JSON object per call in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sae_lens.metrics_logger import MetricsLogger


def read_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_scalars_are_appended_with_their_step(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run")
    logger.log({"loss": 0.5, "l0": 12}, step=10)
    logger.log({"loss": 0.25, "bad": math.nan, "worse": math.inf}, step=20)
    assert read_lines(tmp_path / "run") == [
        {"step": 10, "loss": 0.5, "l0": 12},
        {"step": 20, "loss": 0.25, "bad": None, "worse": None},  # strict JSON has no NaN
    ]
    logger.close()
    # A second logger on the same folder appends (a resumed run keeps its history).
    again = MetricsLogger(tmp_path / "run")
    again.log({"loss": 0.1}, step=30)
    again.close()
    assert [line["step"] for line in read_lines(tmp_path / "run")] == [10, 20, 30]


def test_histograms_are_bin_counts_of_the_finite_values(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    values = torch.tensor([0.0, 1.0, 1.0, 3.0, 4.0, -math.inf, math.nan])
    logger.log_histogram("density", values, step=5, bins=4)
    logger.log_histogram("empty", torch.tensor([math.inf]), step=5)  # nothing finite: nothing written
    logger.close()
    (line,) = read_lines(tmp_path)
    assert line["step"] == 5
    # Range [0, 4] in 4 bins of width 1: {0}, {1, 1}, {}, {3, 4}.
    assert line["density"] == {"min": 0.0, "max": 4.0, "counts": [1, 2, 0, 2]}
