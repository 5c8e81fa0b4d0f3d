"""The real `sae-lens train` (`python -m sae_lens`) when things go wrong: Ctrl-C and SIGTERM sent to
the running process, a second Ctrl-C during the save, a learning rate that makes the loss explode,
and inputs that cannot work (a context the model cannot take, a folder that cannot be written, a
hook that does not exist, an empty dataset). Every user error is one line and exit code 2, found
before any expensive work; signals exit 130 / 143 after saving what was trained.

The three runs that receive real signals are subprocesses, started together by one fixture (most of
the cost is each interpreter importing torch); the other cases call the CLI's `main` in this process,
which is the same code path without the interpreter start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from sae_lens.errors import SAELensError
from sae_lens.saes import SparseAutoencoder
from sae_lens.training.checkpoint import read_checkpoint
from tests.conftest import tiny_corpus_words

TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[2]


# -- helpers shared with the other subprocess tests ------------------------------------------------------


def write_corpus(path: Path, n_sentences: int, seed: int = 3) -> Path:
    """A .txt file of the tiny GPT-2's template sentences, paragraphs of 20 sentences (~8 tokens each)."""
    words = tiny_corpus_words(n_sentences, seed=seed)
    path.write_text("\n\n".join(" ".join(words[i : i + 160]) for i in range(0, len(words), 160)))
    return path


def cli_env() -> dict[str, str]:
    """This process's environment (the session's offline settings) with one torch thread."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "SAE_LENS_TEST_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    env.pop("SAE_LENS_DEBUG", None)
    return env


def cli_args(values: dict[str, Any]) -> list[str]:
    """`--field value` flags for config values (lists as comma-separated sweeps)."""
    args = []
    for name, value in values.items():
        shown = ",".join(str(item) for item in value) if isinstance(value, list) else str(value)
        args += [f"--{name}", shown]
    return args


def train_command(values: dict[str, Any], *extra: str) -> list[str]:
    return [sys.executable, "-m", "sae_lens", "train", *cli_args(values), "--quiet", *extra]


def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = TIMEOUT_S
) -> None:
    """Poll `condition` every 10 ms; fail with the process's stderr if it ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"the process ended (rc {process.returncode}) first:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.01)


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_no_half_written_file(folder: Path) -> None:
    """Every file a run writes is complete: safetensors load, JSON / YAML / JSONL parse, no temporaries."""
    temporaries = [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not temporaries, temporaries
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)


# -- the subprocesses ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario's process(es) did."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("robustness")
    write_corpus(folder / "corpus.txt", 20_000)
    (folder / "empty.txt").write_text("")
    return folder


def tiny_run(tiny_gpt2_dir: Path, workdir: Path, run_name: str, **overrides: Any) -> dict[str, Any]:
    """Config values of a small run of the tiny GPT-2 writing `workdir/runs/<run_name>`."""
    values: dict[str, Any] = {
        "model_name": str(tiny_gpt2_dir),
        "hook_point": "blocks.0.hook_resid_post",
        "dataset_path": str(workdir / "corpus.txt"),
        "context_size": 32,
        "train_batch_size": 256,
        "total_training_tokens": 256 * 40,
        "n_eval_sequences": 4,
        "store_batch_size": 8,
        "n_batches_in_buffer": 4,
        "expansion_factor": 2,
        "k": 8,
        "checkpoint_path": str(workdir / "runs"),
        "run_name": run_name,
    }
    values.update(overrides)
    return values


def _interrupted(command: list[str], cwd: Path, run_dir: Path, signals: list[int]) -> Outcome:
    """Start a long run, wait until it has logged a step, send `signals[0]`; with a second signal,
    wait until the checkpoint's temporary folder exists (the save is under way) and send it."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and metrics.stat().st_size > 0, process)
    process.send_signal(signals[0])
    facts: dict[str, Any] = {"saving_when_signalled_again": False}
    if len(signals) > 1:
        checkpoints = run_dir / "checkpoints"

        def saving() -> bool:
            return checkpoints.is_dir() and any(checkpoints.glob(".step_*.tmp"))

        deadline = time.monotonic() + 60
        while not saving() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        facts["saving_when_signalled_again"] = saving()
        process.send_signal(signals[1])
    out, err = process.communicate(timeout=TIMEOUT_S)
    return Outcome(process.returncode, out, err, time.monotonic() - started, facts)


LONG = {"total_training_tokens": 10**9, "wandb_log_frequency": 1, "eval_every_n_wandb_logs": 10**6}


@pytest.fixture(scope="module")
def outcomes(tiny_gpt2_dir: Path, workdir: Path) -> dict[str, Outcome]:
    """The three runs that receive real signals, run at the same time."""
    runs = workdir / "runs"

    def long_run(name: str, **overrides: Any) -> list[str]:
        return train_command(tiny_run(tiny_gpt2_dir, workdir, name, **{**LONG, **overrides}))

    scenarios: dict[str, Callable[[], Outcome]] = {
        "sigint": lambda: _interrupted(long_run("sigint"), workdir, runs / "sigint", [signal.SIGINT]),
        "sigterm": lambda: _interrupted(
            long_run("sigterm", normalize_activations="expected_average_only_in"),
            workdir,
            runs / "sigterm",
            [signal.SIGTERM],
        ),
        # A wide SAE (d_sae 65536) makes the checkpoint large enough to catch its save under way.
        "double_sigint": lambda: _interrupted(
            long_run("double", expansion_factor=1024),
            workdir,
            runs / "double",
            [signal.SIGINT, signal.SIGINT],
        ),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(scenario) for name, scenario in scenarios.items()}
        return {name: future.result() for name, future in futures.items()}


def run_cli(capsys: pytest.CaptureFixture[str], values: dict[str, Any], *extra: str) -> Outcome:
    """`sae-lens train` in this process (the same `main` the console script calls): its exit code
    and what it printed."""
    from sae_lens.cli import main

    capsys.readouterr()
    started = time.monotonic()
    code = main(["train", *cli_args(values), "--quiet", *extra])
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err, time.monotonic() - started)


# -- Ctrl-C and SIGTERM ------------------------------------------------------------------------------------


SAVED = re.compile(
    r"^sae-lens: interrupted by (SIG\w+) after step (\d+); saved the SAE trained so far to (\S+) "
    r"and a resumable checkpoint to (\S+) \(resume with --resume_from_checkpoint\)$"
)


@pytest.mark.parametrize(("case", "name", "code"), [("sigint", "SIGINT", 130), ("sigterm", "SIGTERM", 143)])
def test_a_signal_saves_the_sae_and_a_checkpoint_and_exits_with_the_shell_code(
    case: str, name: str, code: int, outcomes: dict[str, Outcome], workdir: Path
) -> None:
    outcome = outcomes[case]
    assert outcome.returncode == code, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    match = SAVED.match(lines[-1])
    assert match, lines[-1]
    signal_name, step, sae_folder, checkpoint = match.groups()
    run_dir = workdir / "runs" / ("sigint" if case == "sigint" else "sigterm")
    assert signal_name == name
    assert Path(sae_folder) == run_dir
    assert Path(checkpoint) == run_dir / "checkpoints" / f"step_{step}"

    state = read_checkpoint(checkpoint)
    assert state["manifest"]["step"] == int(step) and int(step) >= 1
    assert state["trainers"][run_dir.name]["n_steps"] == int(step)
    # The SAE folder and the checkpoint's SAE are the same SAE, taking raw activations.
    saved = SparseAutoencoder.load_from_disk(sae_folder)
    in_checkpoint = SparseAutoencoder.load_from_disk(Path(checkpoint) / "saes" / run_dir.name)
    for key, tensor in saved.state_dict().items():
        assert bool((tensor == in_checkpoint.state_dict()[key]).all()), key
    assert_no_half_written_file(run_dir)


def test_a_second_sigint_during_the_save_exits_at_once_leaving_no_half_written_file(
    outcomes: dict[str, Outcome], workdir: Path
) -> None:
    outcome = outcomes["double_sigint"]
    assert outcome.facts["saving_when_signalled_again"], "the save was not caught under way"
    assert outcome.returncode == 130, outcome.stderr[-3000:]
    assert outcome.stderr.strip().splitlines()[-1] == "sae-lens: interrupted"
    assert "Traceback" not in outcome.stderr
    run_dir = workdir / "runs" / "double"
    assert_no_half_written_file(run_dir)
    # The interrupted checkpoint was never completed, so nothing claims to be one.
    assert not list((run_dir / "checkpoints").glob("step_*"))
    assert not (run_dir / "sae_weights.safetensors").exists()


# -- divergence ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged(tiny_gpt2_dir: Path, workdir: Path) -> dict[str, Any]:
    """A diverging standard run (lr 1000) into a fresh folder, and another into the folder of a good
    run with two checkpoints: the outcomes, and that folder's file hashes before and after."""
    from sae_lens.cli import main

    def run(values: dict[str, Any]) -> tuple[int, str]:
        with pytest.MonkeyPatch.context() as patch:
            captured: list[str] = []
            patch.setattr(sys, "stderr", _Tee(captured))
            code = main(["train", *cli_args(values), "--quiet"])
        return code, "".join(captured)

    # A constant lr (the automatic decay starts at once this far above the auto lr), so that the
    # message names exactly the lr that was set.
    fresh = run(
        tiny_run(tiny_gpt2_dir, workdir, "diverge_fresh", architecture="standard", lr=1000, lr_decay_steps=0)
    )
    values = tiny_run(tiny_gpt2_dir, workdir, "diverge", architecture="standard", lr=1e-3, n_checkpoints=2)
    assert main(["train", *cli_args(values), "--quiet"]) == 0
    folder = workdir / "runs" / "diverge"
    before = file_hashes(folder)
    code, stderr = run({**values, "lr": 1000})
    return {"fresh": fresh, "code": code, "stderr": stderr, "before": before, "after": file_hashes(folder)}


class _Tee:
    """A stand-in for sys.stderr that keeps what is written (a module fixture cannot use capsys)."""

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_divergence_is_one_line_naming_step_loss_and_lr(diverged: dict[str, Any], workdir: Path) -> None:
    code, stderr = diverged["fresh"]
    assert code == 2
    stderr = stderr.strip()
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert re.match(r"sae-lens: error: training diverged at step \d+: loss [-+.e\d]+.*\(lr 1000\)", stderr), (
        stderr
    )
    assert not (workdir / "runs" / "diverge_fresh" / "sae_weights.safetensors").exists()


def test_divergence_writes_nothing_over_the_good_run(diverged: dict[str, Any]) -> None:
    assert diverged["code"] == 2 and "Traceback" not in diverged["stderr"]
    before, after = diverged["before"], diverged["after"]
    checkpoints = sorted(name for name in before if name.startswith("checkpoints/"))
    assert len({name.split("/")[1] for name in checkpoints}) == 2  # the good run's two checkpoints
    for name in ["sae_weights.safetensors", "cfg.json", "sparsity.safetensors", *checkpoints]:
        assert after.get(name) == before[name], f"the diverged run replaced {name}"


def test_divergence_leaves_the_folder_describing_the_good_run(diverged: dict[str, Any]) -> None:
    """training_config.yaml is what `--resume_from_checkpoint` reads: after a diverged run it must
    still be the config the folder's SAE and checkpoints were trained with (lr 1e-3, not 1000)."""
    assert diverged["after"]["training_config.yaml"] == diverged["before"]["training_config.yaml"]


# -- user errors: one line, exit 2, before any work -----------------------------------------------------------


def user_error_values(case: str, tiny_gpt2_dir: Path, workdir: Path) -> dict[str, Any]:
    tiny = {
        "model_name": str(tiny_gpt2_dir),
        "dataset_path": str(workdir / "corpus.txt"),
        "checkpoint_path": str(workdir / "runs"),
        "run_name": case,
    }
    cases: dict[str, dict[str, Any]] = {
        # MiniLM (the default model) allows 512 positions.
        "context": {"context_size": 100_000, "checkpoint_path": str(workdir / "runs"), "run_name": "ctx"},
        "unwritable": {"checkpoint_path": "/proc/no_such_place"},
        "missing_hook": {**tiny, "hook_point": "blocks.0.hook_nope"},
        "empty_dataset": {**tiny, "dataset_path": str(workdir / "empty.txt")},
    }
    return cases[case]


USER_ERRORS = {
    "context": "context_size 100000 exceeds sentence-transformers/all-MiniLM-L6-v2's 512 positions",
    "unwritable": "checkpoint_path '/proc/no_such_place' cannot be written",
    "missing_hook": "hook_point 'blocks.0.hook_nope' not found; the model has 2 blocks",
    "empty_dataset": "empty.txt' is empty",
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_is_one_line_and_exit_2(
    case: str, tiny_gpt2_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = run_cli(capsys, user_error_values(case, tiny_gpt2_dir, workdir))
    stderr = outcome.stderr.strip()
    assert outcome.returncode == 2, stderr[-3000:]
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("sae-lens: error: ") and USER_ERRORS[case] in stderr, stderr
    assert not (workdir / "runs" / case).exists()  # no run folder for a run that never started


def test_debug_shows_the_traceback(
    tiny_gpt2_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --debug the error is raised out of `main`, so the interpreter prints its traceback."""
    with pytest.raises(SAELensError, match=r"blocks\.0\.hook_nope"):
        run_cli(capsys, user_error_values("missing_hook", tiny_gpt2_dir, workdir), "--debug")


@pytest.fixture
def forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the model or the data fail the test: these errors must come before either."""
    import sae_lens.runner

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("expensive work started before the input was checked")

    monkeypatch.setattr(sae_lens.runner, "load_model", forbidden)
    monkeypatch.setattr(sae_lens.runner, "ActivationsStore", forbidden)


def test_context_and_folder_checks_come_before_loading_the_model(
    forbid_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = run_cli(capsys, {"context_size": 100_000, "checkpoint_path": str(tmp_path), "run_name": "ctx"})
    assert outcome.returncode == 2 and "--context_size 512 or less" in outcome.stderr
    assert outcome.seconds < 20  # reading the model's config only
    assert list(tmp_path.iterdir()) == []
    outcome = run_cli(capsys, {"checkpoint_path": "/proc/no_such_place"})
    assert outcome.returncode == 2 and "cannot be written (No such file or directory)" in outcome.stderr


# -- the error reference ------------------------------------------------------------------------------------------


def test_the_error_reference_is_current() -> None:
    """docs/errors.md is generated from the source by docs/gen_errors.py; it must not fall behind."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_errors
    finally:
        sys.path.pop(0)
    assert (REPO / "docs" / "errors.md").read_text() == gen_errors.render(), "run `python docs/gen_errors.py`"


def test_the_error_reference_lists_the_errors_tested_here() -> None:
    text = (REPO / "docs" / "errors.md").read_text()
    for fragment in ("training diverged at step", "cannot be written", "is not a complete checkpoint", "143"):
        assert fragment in text, fragment
