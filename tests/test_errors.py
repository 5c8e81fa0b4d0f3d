"""sae_lens/errors.py: the one error type users see."""

from __future__ import annotations

import pytest

from sae_lens.errors import SAELensError


def test_sae_lens_error_is_a_value_error() -> None:
    # Callers that catch ValueError (argparse-style code, notebooks) keep working.
    assert issubclass(SAELensError, ValueError)
    with pytest.raises(ValueError, match="one line"):
        raise SAELensError("one line")


def test_config_errors_are_sae_lens_errors() -> None:
    from tests.conftest import make_runner_config

    with pytest.raises(SAELensError):
        make_runner_config(lr=-1.0)
