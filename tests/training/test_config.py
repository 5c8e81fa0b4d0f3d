"""The trainer's config (sae_lens/training/config.py): defaults, checks naming the field, and the
values derived from it. It knows nothing about models, data or architectures."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sae_lens.errors import SAELensError
from sae_lens.training.config import TrainerConfig


def test_defaults() -> None:
    cfg = TrainerConfig()
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.lr_scheduler_name) == ("auto", 0.9, 0.999, "constant")
    assert cfg.max_grad_norm == 1.0 and cfg.lr_decay_steps == "auto"
    assert (cfg.train_batch_size, cfg.total_training_tokens) == (1024, 300_000)
    assert cfg.normalize_activations == "none" and cfg.b_dec_init_method == "geometric_median"
    assert cfg.dead_feature_threshold == 0.0 and cfg.l1_warm_up_steps == 0
    assert cfg.total_training_steps == 300_000 // 1024


def test_it_declares_no_model_data_or_architecture_fields() -> None:
    names = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert not names & {
        "model_name",
        "hook_point",
        "dataset_path",
        "architecture",
        "k",
        "l1_coefficient",
        "d_in",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("adam_beta1", 1.0),
        ("adam_beta2", -0.1),
        ("lr_scheduler_name", "linear"),
        ("lr_warm_up_steps", -1),
        ("lr_end", -1e-4),
        ("n_restart_cycles", 0),
        ("l1_warm_up_steps", 1.5),
        ("train_batch_size", 0),
        ("total_training_tokens", -5),
        ("b_dec_init_method", "median"),
        ("normalize_activations", "layer_norm"),
        ("feature_sampling_window", 0),
        ("dead_feature_window", 0),
        ("dead_feature_window_tokens", 0),
        ("dead_feature_threshold", -0.01),
        ("wandb_log_frequency", 0),
        ("eval_every_n_wandb_logs", 0),
        ("n_checkpoints", -1),
    ],
)
def test_bad_values_raise_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(SAELensError, match=field) as info:
        TrainerConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_lr_end_above_lr_only_matters_for_a_decaying_schedule() -> None:
    with pytest.raises(SAELensError, match=r"lr_end \(0.01\) must not exceed lr \(0.001\)"):
        TrainerConfig(lr=1e-3, lr_end=1e-2, lr_scheduler_name="cosineannealing")
    # constant without the final decay: lr_end is unused
    assert TrainerConfig(lr=1e-3, lr_end=1e-2, lr_decay_steps=0).lr_end == 1e-2
    with pytest.raises(SAELensError, match=r"lr_end \(0.01\) must not exceed lr"):
        TrainerConfig(lr=1e-3, lr_end=1e-2)  # the default final decay falls to lr_end


def test_total_training_steps() -> None:
    assert TrainerConfig(total_training_tokens=1000, train_batch_size=300).total_training_steps == 3
    # Fewer tokens than one batch still trains one step.
    assert TrainerConfig(total_training_tokens=10, train_batch_size=300).total_training_steps == 1


def test_dead_window_in_tokens_overrides_steps() -> None:
    assert TrainerConfig(dead_feature_window=7).dead_window_steps == 7
    # 10_000 tokens at 1024 per step: dead after ceil(10000 / 1024) = 10 steps without firing.
    assert TrainerConfig(train_batch_size=1024, dead_feature_window_tokens=10_000).dead_window_steps == 10
    assert TrainerConfig(train_batch_size=1024, dead_feature_window_tokens=1).dead_window_steps == 1
    with pytest.raises(SAELensError, match="dead_feature_window_tokens"):
        TrainerConfig(dead_feature_window_tokens=0)


def test_validate_rechecks_after_a_change() -> None:
    cfg = TrainerConfig()
    cfg.lr = -1.0
    with pytest.raises(SAELensError, match="lr must be positive"):
        cfg.validate()


def test_auto_lr_by_hand() -> None:
    from sae_lens.training.config import AUTO_LR_BASE, auto_lr

    assert auto_lr(6144, 1024) == pytest.approx(AUTO_LR_BASE)
    # A 4x wider SAE halves it; a 4x larger batch doubles it (square roots).
    assert auto_lr(4 * 6144, 1024) == pytest.approx(AUTO_LR_BASE / 2)
    assert auto_lr(6144, 4096) == pytest.approx(AUTO_LR_BASE * 2)
    assert auto_lr(16, 1 << 20) == 1e-2  # capped
    cfg = TrainerConfig(train_batch_size=4096)
    assert cfg.resolved_lr(6144) == pytest.approx(2 * AUTO_LR_BASE)
    assert TrainerConfig(lr=3e-4).resolved_lr(6144) == 3e-4


def test_lr_takes_a_number_or_auto_only() -> None:
    with pytest.raises(SAELensError, match="lr must be positive or 'auto', got 'fast'"):
        TrainerConfig(lr="fast")
    with pytest.raises(SAELensError, match="lr must be positive or 'auto'"):
        TrainerConfig(lr=0.0)


def test_decay_steps_as_a_fraction_of_the_run() -> None:
    cfg = TrainerConfig(total_training_tokens=100_000, train_batch_size=1000, lr_decay_steps=0.2)
    assert cfg.decay_steps_for(1e-3, 6144) == 20
    assert TrainerConfig(lr_decay_steps=7).decay_steps_for(1e-3, 6144) == 7


def test_auto_decay_is_a_fifth_up_to_the_auto_lr_and_the_whole_run_from_twice_it() -> None:
    cfg = TrainerConfig(total_training_tokens=100_000, train_batch_size=1024)  # 97 steps
    auto = cfg.auto_lr_for(6144)
    assert auto == pytest.approx(1.4e-3)
    assert cfg.decay_steps_for(auto / 10, 6144) == cfg.decay_steps_for(auto, 6144) == round(0.2 * 97)
    assert cfg.decay_steps_for(1.5 * auto, 6144) == round(0.6 * 97)  # 0.2 + 0.8 x 0.5
    assert cfg.decay_steps_for(2 * auto, 6144) == cfg.decay_steps_for(10 * auto, 6144) == 97
    # The auto lr falls with the width, so the same lr is "high" for a wider SAE.
    assert cfg.decay_steps_for(auto, 4 * 6144) == 97


def test_lr_decay_steps_is_a_number_or_auto() -> None:
    with pytest.raises(SAELensError, match="lr_decay_steps must be a non-negative number or 'auto'"):
        TrainerConfig(lr_decay_steps=-1)
    with pytest.raises(SAELensError, match="lr_decay_steps"):
        TrainerConfig(lr_decay_steps="soon")
