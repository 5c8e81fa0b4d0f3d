"""How training stops early (sae_lens/training/stopping.py and the trainer's use of it): real SIGINT /
SIGTERM signals sent to this process finish the step in progress, checkpoint and raise
`TrainingInterrupted`; a second signal interrupts at once; a loss that explodes stops the run
before the optimiser step with a one-line `TrainingDiverged`."""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import SparseAutoencoder
from sae_lens.training import SAETrainer
from sae_lens.training.checkpoint import read_checkpoint
from sae_lens.training.stopping import GracefulStop, TrainingDiverged, TrainingInterrupted
from tests.conftest import _sparse_data, make_runner_config

BATCH = 64


def make_trainer(checkpoint_dir: Path | None = None, **overrides: Any) -> SAETrainer:
    values: dict[str, Any] = {
        "architecture": "topk",
        "k": 4,
        "d_in": 16,
        "d_sae": 64,
        "lr": 3e-3,
        "train_batch_size": BATCH,
        "total_training_tokens": BATCH * 50,
        "normalize_activations": "expected_average_only_in",
    }
    values.update(overrides)
    cfg = make_runner_config(**values)
    torch.manual_seed(0)
    return SAETrainer(cfg, SparseAutoencoder(cfg), checkpoint_dir=checkpoint_dir, show_progress=False)


def signalling_batches(signals: dict[int, list[int]], n: int = 50) -> Iterator[torch.Tensor]:
    """Batches of sparse data; before yielding batch i, send this process the signals `signals[i]`."""
    for i in range(n):
        for number in signals.get(i, []):
            os.kill(os.getpid(), number)
        yield 5.0 * _sparse_data(BATCH, seed=i)


@pytest.fixture
def default_handlers() -> Iterator[None]:
    """The tests send real signals; whatever happens, the usual handlers are back afterwards."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    # A background job starts with SIGINT ignored; the tests need Python's own handler to begin with.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for number, handler in before.items():
        signal.signal(number, handler)


# -- GracefulStop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_only_sets_requested_and_the_handlers_come_back(number: int, default_handlers: None) -> None:
    before = signal.getsignal(number)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), number)
        assert stop.requested == number  # no exception: the loop decides when to stop
        assert signal.getsignal(number) is not before
    assert signal.getsignal(number) is before


def test_a_second_signal_interrupts_at_once(default_handlers: None) -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info, GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second signal did not interrupt")
    assert not isinstance(info.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_it_installs_nothing() -> None:
    seen: dict[str, Any] = {}

    def run() -> None:
        with GracefulStop() as stop:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["requested"] = stop.requested

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": None}


def test_training_interrupted_carries_the_shell_exit_codes() -> None:
    interrupted = TrainingInterrupted(signal.SIGINT, 7, Path("ckpt/step_7"))
    assert isinstance(interrupted, KeyboardInterrupt)
    assert interrupted.exit_code == 130 and interrupted.step == 7
    assert str(interrupted) == "interrupted by SIGINT after step 7"
    assert TrainingInterrupted(signal.SIGTERM, 1, None).exit_code == 143


# -- the trainer under real signals --------------------------------------------------------------------


@pytest.mark.parametrize(("number", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_fit_finishes_the_step_checkpoints_and_raises(
    number: int, code: int, tmp_path: Path, default_handlers: None
) -> None:
    trainer = make_trainer(checkpoint_dir=tmp_path)
    before = signal.getsignal(number)
    # The signal arrives while batch 7 is being produced: step 7 (one-based) still runs.
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(signalling_batches({6: [number]}))
    stopped = info.value
    assert stopped.signal_number == number and stopped.exit_code == code
    assert stopped.step == trainer.n_steps == 7
    assert stopped.checkpoint == tmp_path / "step_7"
    state = read_checkpoint(tmp_path / "step_7")
    assert state["manifest"]["step"] == 7 and state["trainers"]["sae"]["n_steps"] == 7
    # The SAE in memory takes raw activations now; the checkpoint kept the training form.
    assert trainer.state.input_scale == 1.0 and state["trainers"]["sae"]["input_scale"] != 1.0
    assert signal.getsignal(number) is before


def test_a_second_signal_during_fit_stops_without_a_checkpoint(
    tmp_path: Path, default_handlers: None
) -> None:
    trainer = make_trainer(checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit(signalling_batches({3: [signal.SIGINT, signal.SIGINT]}))
    assert not isinstance(info.value, TrainingInterrupted)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- divergence -------------------------------------------------------------------------------------------


def test_divergence_names_the_step_the_loss_and_the_lr_and_skips_the_update(tmp_path: Path) -> None:
    trainer = make_trainer(
        checkpoint_dir=tmp_path,
        architecture="standard",
        l1_coefficient=1e-3,
        lr=1000.0,
        lr_decay_steps=0,  # the message names the lr of the step, so keep it at 1000
        normalize_activations="none",
        n_checkpoints=49,  # one per step: the step before the divergence is on disk
    )
    data = list(signalling_batches({}, n=50))
    trainer.begin(data[0])
    weights: dict[str, torch.Tensor] = {}
    with pytest.raises(TrainingDiverged) as info:
        for x in data:
            weights = {name: tensor.clone() for name, tensor in trainer.sae.state_dict().items()}
            trainer.step(x)
    error = info.value
    assert isinstance(error, SAELensError)
    message = str(error)
    step = trainer.n_steps + 1
    assert "\n" not in message
    assert message.startswith(f"training diverged at step {step}: loss ")
    assert "(lr 1000)" in message and "lower lr" in message
    # The optimiser step of the diverging step was not taken.
    for name, tensor in trainer.sae.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    # The checkpoints of the steps before are intact and nothing was written for the bad step.
    assert read_checkpoint(tmp_path / f"step_{step - 1}")["manifest"]["step"] == step - 1
    assert not (tmp_path / f"step_{step}").exists()


def test_a_nan_batch_stops_at_that_step() -> None:
    trainer = make_trainer(normalize_activations="none")
    data = list(signalling_batches({}, n=5))
    data[3] = data[3].clone()
    data[3][0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match=r"at step 4: loss nan"):
        trainer.fit(data)
    assert trainer.n_steps == 3


def test_a_loss_within_the_factor_trains_on() -> None:
    """Ordinary training (whose loss falls) never trips the guard; a tight factor trips it as soon
    as the loss rises past it."""
    trainer = make_trainer(normalize_activations="none", total_training_tokens=BATCH * 20)
    trainer.fit(signalling_batches({}, n=20))
    assert trainer.n_steps == 20
    first = trainer.state.first_loss
    assert math.isfinite(first) and first > 0

    tight = make_trainer(
        normalize_activations="none", divergence_factor=1.5, total_training_tokens=BATCH * 20
    )
    data = list(signalling_batches({}, n=20))
    data[5] = data[5] * 10  # 100x the squared error of a typical batch
    with pytest.raises(TrainingDiverged, match=r"at step 6: .*over 1.5x its first-step value"):
        tight.fit(data)
