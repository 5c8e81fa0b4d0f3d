"""The end-of-training check: hand-made metrics first, then real runs made bad on purpose."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from sae_lens.training.health import loss_rose, training_warnings, typical_explained_variance
from tests.conftest import make_runner_config


def test_the_explained_variance_floor_by_hand() -> None:
    assert typical_explained_variance(4) == pytest.approx(0.35)
    assert typical_explained_variance(32) == pytest.approx(0.35 + 0.1 * 3)
    assert typical_explained_variance(1) == pytest.approx(0.15)
    assert typical_explained_variance(4096) == 0.7  # capped
    assert typical_explained_variance(0) == 0.0


def test_a_healthy_run_gets_no_warning() -> None:
    metrics = {"explained_variance": 0.82, "l0": 32.0, "dead_fraction": 0.01}
    assert training_warnings(metrics, [1.0, 0.6, 0.4, 0.3, 0.25, 0.24], "topk") == []


def test_each_problem_is_one_line_with_its_fix() -> None:
    metrics = {"explained_variance": 0.40, "l0": 32.0, "dead_fraction": 0.25}
    found = training_warnings(metrics, [1.0, 0.5, 0.4, 0.6, 0.8, 0.9], "topk")
    assert len(found) == 3 and all("\n" not in line for line in found)
    dead, rose, low = found
    assert dead.startswith("25% of the latents are dead") and "aux_k_coefficient" in dead
    assert "rose from 0.4 to 0.9" in rose and "lower lr" in rose
    assert "0.400 is below the 0.65" in low and "L0 32.0" in low


def test_a_loss_spike_over_three_times_the_first_step_is_warned_about() -> None:
    assert training_warnings({}, [1.0, 2.9, 0.5, 0.4, 0.3, 0.3]) == []
    (found,) = training_warnings({}, [1.0, 3.5, 0.5, 0.4, 0.3, 0.3])
    assert found.startswith("the training loss jumped to 3.5x its first-step value")


def test_the_dead_latent_fix_depends_on_the_architecture() -> None:
    found = training_warnings({"dead_fraction": 0.5}, [], "standard")
    assert "sparsity coefficient" in found[0] and "topk" in found[0]


def test_ten_percent_dead_is_the_limit() -> None:
    assert training_warnings({"dead_fraction": 0.10}, [], "topk") == []
    assert len(training_warnings({"dead_fraction": 0.11}, [], "topk")) == 1


def test_the_loss_rising_is_judged_on_the_last_fifth_against_the_first_half() -> None:
    assert loss_rose([1.0, 0.5, 0.4, 0.3]) is None  # too few logs to tell
    # One noisy last batch is not a rise: the mean of the last 2 of 10 is (0.30 + 0.50) / 2 = 0.40 <= 1.1 x 0.4.
    assert loss_rose([1.0, 0.8, 0.6, 0.5, 0.4, 0.38, 0.35, 0.32, 0.30, 0.50]) is None
    low, last = loss_rose([1.0, 0.8, 0.6, 0.5, 0.4, 0.45, 0.5, 0.55, 0.60, 0.70]) or (0, 0)
    assert (low, last) == (0.4, pytest.approx(0.65))
    assert loss_rose([1.0, math.nan, 0.5, 0.4, 0.3, 0.2]) is None  # NaN logs are skipped


def test_a_transcoder_is_not_held_to_the_sae_floor() -> None:
    assert training_warnings({"explained_variance": 0.1, "l0": 32.0}, [], "topk", transcoder=True) == []


# -- real runs, bad on purpose ------------------------------------------------------------------------


STARVED = {"architecture": "standard", "l1_coefficient": 100.0, "lr": 1e-2, "dead_feature_window": 10}
"""A dictionary most of whose latents stop firing: a huge L1 penalty, a short dead window."""


def _run(tiny_gpt2: Any, tmp_path: Path, tiny_corpus_text: str, **values: Any) -> Any:
    from sae_lens.runner import train_sae

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([tiny_corpus_text] * 4))  # enough tokens for the whole budget
    cfg = make_runner_config(
        model_name="tiny",
        hook_point="blocks.0.hook_resid_post",
        dataset_path=str(corpus),
        context_size=32,
        train_batch_size=128,
        total_training_tokens=128 * 60,
        n_eval_sequences=4,
        store_batch_size=8,
        n_batches_in_buffer=4,
        wandb_log_frequency=5,
        checkpoint_path=str(tmp_path / "out"),
        run_name="run",
        **values,
    )
    return train_sae(cfg, model=tiny_gpt2, show_progress=False)


def test_a_learning_rate_far_too_high_is_warned_about(
    tiny_gpt2: Any, tmp_path: Path, tiny_corpus_text: str
) -> None:
    # Large enough to wreck training, not enough to trip the divergence guard (which stops the run).
    result = _run(
        tiny_gpt2,
        tmp_path,
        tiny_corpus_text,
        architecture="standard",
        lr=0.3,
        l1_coefficient=1e-3,
        divergence_factor=1e6,
        max_grad_norm=None,
        # Constant: the automatic decay would bring an lr this far above the auto lr down from
        # the first step (which is what makes high lrs safer by default).
        lr_decay_steps=0,
    )
    jumped = [line for line in result.warnings if "loss jumped to" in line]
    assert jumped and "lr is too high" in jumped[0], result.warnings
    assert result.lr == 0.3


def test_a_dictionary_with_many_dead_latents_is_warned_about(
    tiny_gpt2: Any, tmp_path: Path, tiny_corpus_text: str
) -> None:
    # A sparsity penalty so strong that most latents stop firing.
    result = _run(tiny_gpt2, tmp_path, tiny_corpus_text, **STARVED)
    assert result.dead_in_training > 0.1
    assert any("of the latents are dead" in line for line in result.warnings), result.warnings


def test_the_cli_summary_prints_the_warnings(tiny_gpt2: Any, tmp_path: Path, tiny_corpus_text: str) -> None:
    from sae_lens.cli.train import _print_summary

    result = _run(tiny_gpt2, tmp_path, tiny_corpus_text, **STARVED)
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _print_summary(result, tmp_path / "report.html")
    assert "  warning: " in printed.getvalue() and "latents are dead" in printed.getvalue()
