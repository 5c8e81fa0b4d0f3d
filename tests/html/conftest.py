"""Fixtures for the HTML front-end tests: one headless Chromium per session, and pages written once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, BrowserUnavailable, launch_browser
from synthetic_dashboard import N_FEATURES, synthetic_dashboard_data
from synthetic_metrics import write_metrics

from sae_lens.html import write_dashboard_html, write_training_report


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """A launched headless Chromium, or a skip naming why it could not start (a failure under
    SAE_LENS_REQUIRE_BROWSER=1)."""
    try:
        launched = launch_browser()
    except BrowserUnavailable as error:
        # CI sets SAE_LENS_REQUIRE_BROWSER=1 so that a missing install fails instead of skipping quietly.
        if os.environ.get("SAE_LENS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SAE_LENS_REQUIRE_BROWSER=1 but {error}")
        pytest.skip(f"real-browser test skipped: {error}")
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture(scope="session")
def dashboard_data() -> dict[str, Any]:
    """300 synthetic features (indices 0, 2, ..., 598 of d_sae 600), quantile intervals, W_U logits, a prompt."""
    return synthetic_dashboard_data(N_FEATURES, seed=1)


@pytest.fixture(scope="session")
def dashboard_page(dashboard_data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dashboard_html(dashboard_data, tmp_path_factory.mktemp("dashboard") / "dashboard.html")


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a synthetic standard-SAE metrics.jsonl and its report.html written."""
    folder = tmp_path_factory.mktemp("run")
    write_metrics(folder)
    write_training_report(folder)
    return folder
