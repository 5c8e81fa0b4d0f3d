"""Learning-rate schedules (sae_lens/training/lr_schedules.py) checked against hand computations."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from sae_lens.training.config import TrainerConfig
from sae_lens.training.lr_schedules import build_lr_lambda

# -- learning-rate schedules --------------------------------------------------------------------------


def schedule_cfg(**kw: Any) -> TrainerConfig:
    # 10 steps of 10 tokens. The schedules read only the trainer's part of a config.
    # No final decay unless a test asks for one (the default decays the last 20% of a run).
    return TrainerConfig(
        total_training_tokens=100, train_batch_size=10, lr=1e-3, **({"lr_decay_steps": 0} | kw)
    )


def test_constant_with_warm_up() -> None:
    f = build_lr_lambda(schedule_cfg(lr_warm_up_steps=4))
    assert [f(step) for step in range(7)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    g = build_lr_lambda(schedule_cfg())
    assert [g(step) for step in (0, 5, 9)] == [1.0, 1.0, 1.0]


def test_a_linear_decay_over_the_last_steps() -> None:
    # 10 steps, the last 4 decaying to 0: multipliers 4/5, 3/5, 2/5, 1/5 on steps 6..9.
    f = build_lr_lambda(schedule_cfg(lr_decay_steps=4))
    assert [f(step) for step in range(10)] == pytest.approx([1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    # To lr_end instead of 0, and as a fraction of the run (0.2 x 10 steps = 2).
    g = build_lr_lambda(schedule_cfg(lr_decay_steps=0.2, lr_end=1e-4))
    assert [g(step) for step in (7, 8, 9)] == pytest.approx([1.0, 0.1 + 0.9 * 2 / 3, 0.1 + 0.9 / 3])


def test_auto_lr_needs_the_resolved_value() -> None:
    with pytest.raises(ValueError, match="resolves per SAE"):
        build_lr_lambda(TrainerConfig())
    assert build_lr_lambda(TrainerConfig(), lr=2e-3, d_sae=6144)(0) == 1.0


def test_cosine_annealing_ends_at_lr_end() -> None:
    f = build_lr_lambda(schedule_cfg(lr_scheduler_name="cosineannealing", lr_end=1e-4))
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.55)  # halfway: floor + (1 - floor) / 2
    assert f(10) == pytest.approx(0.1)  # lr_end / lr
    values = [f(step) for step in range(11)]
    assert all(a > b for a, b in itertools.pairwise(values))
    # lr_end defaults to lr / 10.
    g = build_lr_lambda(schedule_cfg(lr_scheduler_name="cosineannealing"))
    assert g(10) == pytest.approx(0.1)
    # After warm-up the cosine starts from 1.
    h = build_lr_lambda(schedule_cfg(lr_scheduler_name="cosineannealing", lr_warm_up_steps=2, lr_end=0.0))
    assert [h(0), h(1), h(2)] == pytest.approx([0.5, 1.0, 1.0])
    assert h(6) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert h(10) == pytest.approx(0.0, abs=1e-12)


def test_cosine_warm_restarts_returns_to_one_at_cycle_start() -> None:
    f = build_lr_lambda(
        schedule_cfg(lr_scheduler_name="cosineannealingwarmrestarts", n_restart_cycles=2, lr_end=0.0)
    )
    # Two cycles of 5 steps.
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(1.0)
    assert f(4) < 0.2 and f(9) < 0.2
    assert [f(s) for s in range(5)] == pytest.approx([f(s) for s in range(5, 10)])
    assert f(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_a_runner_config_gives_the_same_schedule() -> None:
    from tests.conftest import make_runner_config

    kw: dict[str, Any] = {"lr_scheduler_name": "cosineannealing", "lr_warm_up_steps": 3, "lr_end": 2e-4}
    trainer_only = build_lr_lambda(schedule_cfg(**kw))
    runner = build_lr_lambda(
        make_runner_config(total_training_tokens=100, train_batch_size=10, lr=1e-3, **kw)
    )
    assert [runner(step) for step in range(11)] == [trainer_only(step) for step in range(11)]
