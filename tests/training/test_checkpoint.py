"""Checkpoints (sae_lens/training/checkpoint.py): a step_N folder that holds the SAE (raw scale,
loadable as it is) and the whole training state; written atomically, checked on reading, and
enough to continue a run bitwise exactly (CPU, one thread)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import SparseAutoencoder
from sae_lens.training import SAETrainer
from sae_lens.training.checkpoint import (
    MANIFEST_FILENAME,
    SAES_FOLDER,
    STATE_FILENAME,
    latest_checkpoint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from sae_lens.version import __version__
from tests.conftest import make_runner_config

D_IN, D_SAE, BATCH, N_STEPS = 16, 64, 64, 20


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Bitwise comparisons need the same reduction order in both runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_cfg(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "architecture": "topk",
        "k": 4,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "lr": 3e-3,
        "lr_scheduler_name": "cosineannealing",
        "train_batch_size": BATCH,
        "total_training_tokens": BATCH * N_STEPS,
        "b_dec_init_method": "geometric_median",
        "dead_feature_window": 3,
        "feature_sampling_window": 4,
        "wandb_log_frequency": 5,
    }
    values.update(overrides)
    return make_runner_config(**values)


def batches(n: int = N_STEPS, scale: float = 40.0) -> list[torch.Tensor]:
    """Sparse combinations of 32 random directions, far from unit norm (so an input scale matters)."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(32, D_IN, generator=gen)
    out = []
    for _ in range(n):
        active = torch.rand(BATCH, 32, generator=gen) < 3 / 32
        out.append(scale * (active * (torch.rand(BATCH, 32, generator=gen) + 0.5)) @ directions)
    return out


def trainer_for(cfg: Any, seed: int = 0, **kwargs: Any) -> SAETrainer:
    torch.manual_seed(seed)
    return SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False, **kwargs)


def small_checkpoint(path: Path, step: int = 3) -> Path:
    """A checkpoint of one fresh SAE, written through the public function."""
    trainer = trainer_for(make_cfg())
    return write_checkpoint(
        path,
        sae_writers={"sae": trainer.write_sae_folder},
        training_states={"sae": trainer.state.state_dict()},
        step=step,
        tokens=step * BATCH,
        extra={"store": {"rows_consumed": 7}},
    )


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an atomic write would have left behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old"))


# -- the format -------------------------------------------------------------------------------------


def test_round_trip_holds_the_states_the_manifest_and_a_loadable_sae(tmp_path: Path) -> None:
    cfg = make_cfg()
    trainer = trainer_for(cfg)
    trainer.fit(batches(4))
    path = write_checkpoint(
        tmp_path / "step_4",
        sae_writers={"first": trainer.write_sae_folder},
        training_states={"first": trainer.state.state_dict()},
        step=4,
        tokens=4 * BATCH,
        extra={"store": {"rows_consumed": 11, "pending": [1, 2, 3]}},
    )
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILENAME, SAES_FOLDER, STATE_FILENAME]
    manifest = json.loads((path / MANIFEST_FILENAME).read_text())
    assert manifest["step"] == 4 and manifest["tokens"] == 4 * BATCH
    assert manifest["saes"] == ["first"] and manifest["sae_lens_version"] == __version__
    assert len(manifest["state_sha256"]) == 64

    state = read_checkpoint(path)
    assert state["manifest"] == manifest
    assert state["store"] == {"rows_consumed": 11, "pending": [1, 2, 3]}
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    saved = state["trainers"]["first"]
    assert saved["n_steps"] == 4 and saved["n_tokens"] == 4 * BATCH
    for name, tensor in trainer.sae.state_dict().items():
        assert torch.equal(saved["sae"][name], tensor), name
    loaded = SparseAutoencoder.load_from_disk(path / SAES_FOLDER / "first")
    x = batches(1)[0]
    torch.testing.assert_close(loaded(x), trainer.sae(x), rtol=0, atol=0)


def test_rng_states_are_restored_for_torch_numpy_and_python() -> None:
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(100), np.random.rand(100), random.random()
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_the_saved_sae_takes_raw_activations_and_training_is_left_unchanged(tmp_path: Path) -> None:
    """With normalize_activations the trainer works on s*x; the checkpoint's SAE folds s in (on a
    copy), so it reconstructs raw x: f(x) = sae_s(s*x) / s."""
    cfg = make_cfg(normalize_activations="expected_average_only_in")
    trainer = trainer_for(cfg)
    data = batches(3)
    trainer.begin(data[0])
    for x in data:
        trainer.step(x)
    scale = trainer.state.input_scale
    assert scale != pytest.approx(1.0, rel=0.1)  # the data is far from norm sqrt(d_in)
    before = {name: tensor.clone() for name, tensor in trainer.sae.state_dict().items()}
    path = trainer.save_checkpoint(tmp_path / "step_3")
    for name, tensor in trainer.sae.state_dict().items():
        assert torch.equal(tensor, before[name]), f"saving changed the training SAE's {name}"
    assert trainer.state.input_scale == scale

    loaded = SparseAutoencoder.load_from_disk(path / SAES_FOLDER / trainer.name)
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trainer.sae(x * scale) / scale, rtol=1e-5, atol=1e-5)
    # The training state keeps the training form: the same scale, the unfolded weights.
    state = read_checkpoint(path)["trainers"][trainer.name]
    assert state["input_scale"] == scale
    assert torch.equal(state["sae"]["W_enc"], before["W_enc"])


# -- atomicity ------------------------------------------------------------------------------------------


def test_a_failing_sae_writer_leaves_no_checkpoint(tmp_path: Path) -> None:
    trainer = trainer_for(make_cfg())

    def half_written(folder: Path) -> Path:
        trainer.write_sae_folder(folder)  # the first SAE is complete ...
        raise OSError("disk full")  # ... and the crash comes before the state and the manifest

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(
            tmp_path / "step_5",
            sae_writers={"a": trainer.write_sae_folder, "b": half_written},
            training_states={"a": trainer.state.state_dict(), "b": trainer.state.state_dict()},
            step=5,
            tokens=5 * BATCH,
        )
    assert not (tmp_path / "step_5").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too
    with pytest.raises(SAELensError, match="not a complete checkpoint"):
        read_checkpoint(tmp_path / "step_5")
    assert latest_checkpoint(tmp_path) is None


def test_a_failing_rewrite_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path / "step_3")
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def crash(folder: Path) -> None:
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of the save

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(path, sae_writers={"sae": crash}, training_states={}, step=3, tokens=0)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert leftovers(tmp_path) == []
    assert read_checkpoint(path)["manifest"]["step"] == 3


# -- refusing damaged checkpoints ----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    state = path / STATE_FILENAME
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    state = path / STATE_FILENAME
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))


def _bad_json(path: Path) -> None:
    (path / MANIFEST_FILENAME).write_text("{not json")


def _other_format(path: Path) -> None:
    manifest = json.loads((path / MANIFEST_FILENAME).read_text())
    (path / MANIFEST_FILENAME).write_text(json.dumps({**manifest, "format": 99}))


DAMAGES = {
    "truncated_state": (_truncate, "does not match its checksum"),
    "flipped_byte": (_flip_a_byte, "does not match its checksum"),
    "no_manifest": (lambda path: (path / MANIFEST_FILENAME).unlink(), "not a complete checkpoint"),
    "no_state": (lambda path: (path / STATE_FILENAME).unlink(), "not a complete checkpoint"),
    "manifest_not_json": (_bad_json, "not valid JSON"),
    "unknown_format": (_other_format, "has format 99"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_in_one_line(damage: str, tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path / "step_3")
    spoil, message = DAMAGES[damage]
    spoil(path)
    with pytest.raises(SAELensError, match=message) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def _fix_checksum(path: Path) -> None:
    """Make the manifest's checksum match the state file, as a consistent but hostile writer would."""
    import hashlib

    manifest = json.loads((path / MANIFEST_FILENAME).read_text())
    manifest["state_sha256"] = hashlib.sha256((path / STATE_FILENAME).read_bytes()).hexdigest()
    (path / MANIFEST_FILENAME).write_text(json.dumps(manifest))


class NotAllowed:
    """An arbitrary object: `torch.load(weights_only=True)` must refuse to unpickle it."""


def test_a_state_file_with_arbitrary_objects_is_never_unpickled(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path / "step_3")
    torch.save({"format": 1, "trainers": {}, "payload": NotAllowed()}, path / STATE_FILENAME)
    _fix_checksum(path)
    with pytest.raises(SAELensError, match="cannot be read"):
        read_checkpoint(path)


def test_a_state_file_that_is_not_a_torch_file_is_refused(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path / "step_3")
    (path / STATE_FILENAME).write_bytes(b"plain text, not a zip archive")
    _fix_checksum(path)
    with pytest.raises(SAELensError, match="cannot be read"):
        read_checkpoint(path)


def test_latest_checkpoint_is_the_largest_complete_step(tmp_path: Path) -> None:
    for step in (9, 20, 100):
        small_checkpoint(tmp_path / f"step_{step}", step=step)
    (tmp_path / "step_300").mkdir()  # no manifest: an interrupted copy, not a checkpoint
    (tmp_path / ".step_400.abc.tmp").mkdir()
    (tmp_path / "step_final").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_100"  # numerically, not as text
    assert latest_checkpoint(tmp_path / "nothing_here") is None


# -- checkpoints written by the trainer ----------------------------------------------------------------


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in folder.glob("step_*"))


def test_n_checkpoints_are_evenly_spaced_and_keep_last_n_prunes_the_oldest(tmp_path: Path) -> None:
    # 20 steps, 4 checkpoints: round(20 * i / 5) for i = 1..4.
    trainer = trainer_for(make_cfg(n_checkpoints=4), checkpoint_dir=tmp_path / "all")
    trainer.fit(batches())
    assert _steps(tmp_path / "all") == [4, 8, 12, 16]

    pruned = trainer_for(
        make_cfg(n_checkpoints=4, keep_last_n_checkpoints=2), checkpoint_dir=tmp_path / "two"
    )
    pruned.fit(batches())
    assert _steps(tmp_path / "two") == [12, 16]
    for step in (12, 16):
        assert read_checkpoint(tmp_path / "two" / f"step_{step}")["manifest"]["step"] == step
    assert leftovers(tmp_path) == []


def test_keep_last_n_never_counts_an_incomplete_folder(tmp_path: Path) -> None:
    """A step folder without a manifest (not a checkpoint) must not push a real one out."""
    folder = tmp_path / "ckpts"
    (folder / "step_1").mkdir(parents=True)
    trainer = trainer_for(make_cfg(n_checkpoints=4, keep_last_n_checkpoints=1), checkpoint_dir=folder)
    trainer.fit(batches())
    complete = [step for step in _steps(folder) if (folder / f"step_{step}" / MANIFEST_FILENAME).is_file()]
    assert complete == [16]


@pytest.mark.parametrize(
    "overrides",
    [
        {"architecture": "topk", "k": 4, "normalize_activations": "expected_average_only_in"},
        {"architecture": "standard", "l1_coefficient": 0.05, "b_dec_init_method": "mean"},
    ],
    ids=["topk-normalized", "standard"],
)
def test_resuming_from_a_checkpoint_file_is_bitwise_the_uninterrupted_run(
    overrides: dict[str, Any], tmp_path: Path
) -> None:
    cfg = make_cfg(n_checkpoints=3, **overrides)  # checkpoints at steps 5, 10, 15
    data = batches()
    uninterrupted = trainer_for(cfg, checkpoint_dir=tmp_path / "run")
    uninterrupted.fit(data)
    checkpoint = read_checkpoint(tmp_path / "run" / "step_10")

    resumed = trainer_for(cfg, seed=1234)  # other initial weights: the checkpoint must replace them
    resumed.state.load_state_dict(checkpoint["trainers"][uninterrupted.name])
    assert resumed.n_steps == 10
    resumed.fit(data[10:])
    assert resumed.n_steps == N_STEPS
    assert resumed.state.input_scale == uninterrupted.state.input_scale == 1.0  # both folded at the end
    want, got = uninterrupted.sae.state_dict(), resumed.sae.state_dict()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"resumed training differs in {different}"
    assert torch.equal(resumed.state.fire_counts, uninterrupted.state.fire_counts)
