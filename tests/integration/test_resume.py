"""Exact resume (`sae-lens train --resume_from_checkpoint PATH`, sae_lens/runner.py): a run killed with
a real SIGKILL after a checkpoint and resumed from it, with the config read from its run folder,
ends with weights bitwise equal to an uninterrupted run (CPU, one thread). Damaged checkpoints are
refused in one line; `keep_last_n_checkpoints` keeps the last N; a crash while a checkpoint is
being written leaves nothing that passes for one.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sae_lens.errors import SAELensError
from sae_lens.runner import train_sae, train_saes
from sae_lens.training import SAETrainer
from sae_lens.training.checkpoint import MANIFEST_FILENAME, STATE_FILENAME, read_checkpoint
from tests.conftest import make_runner_config
from tests.integration.test_robustness import cli_env, train_command, wait_until, write_corpus

TIMEOUT_S = 300
STEPS, BATCH = 200, 256  # checkpoints at steps 50, 100 and 150
CASES: dict[str, dict[str, Any]] = {
    "topk": {"architecture": "topk", "k": 8},
    "standard-normalized": {"architecture": "standard", "normalize_activations": "expected_average_only_in"},
}
TIMING_KEYS = {"tokens_per_second"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The uninterrupted runs train in this process; bitwise equality needs one thread, as the CLI has."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    write_corpus(folder / "corpus.txt", 20_000)
    return folder


def run_values(tiny_gpt2_dir: Path, workdir: Path, checkpoint_path: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_name": str(tiny_gpt2_dir),
        "hook_point": "blocks.0.hook_resid_post",
        "dataset_path": str(workdir / "corpus.txt"),
        "context_size": 32,
        "train_batch_size": BATCH,
        "total_training_tokens": BATCH * STEPS,
        "n_eval_sequences": 4,
        "store_batch_size": 8,
        "n_batches_in_buffer": 4,
        "expansion_factor": 2,
        "n_checkpoints": 3,
        "wandb_log_frequency": 10,
        "eval_every_n_wandb_logs": 5,
        "checkpoint_path": str(checkpoint_path),
    }
    values.update(overrides)
    return values


def _kill_after_first_checkpoint_then_resume(values: dict[str, Any], cwd: Path) -> dict[str, Any]:
    run_dir = Path(values["checkpoint_path"]) / values["run_name"]
    first = run_dir / "checkpoints" / "step_50"
    process = subprocess.Popen(
        train_command(values),
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: (first / MANIFEST_FILENAME).is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=TIMEOUT_S)
    facts: dict[str, Any] = {
        "killed_returncode": process.returncode,
        "final_sae_at_kill": (run_dir / "sae_weights.safetensors").exists(),
        "config_before": (run_dir / "training_config.yaml").read_bytes(),
    }
    resume = [sys.executable, "-m", "sae_lens", "train", "--resume_from_checkpoint", str(first), "--quiet"]
    result = subprocess.run(
        resume, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    facts.update(returncode=result.returncode, stdout=result.stdout, stderr=result.stderr, run_dir=run_dir)
    return facts


@pytest.fixture(scope="module")
def resumed(tiny_gpt2: Any, tiny_gpt2_dir: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    """Per case: a CLI run killed after its first checkpoint and resumed by the CLI, and the same run
    uninterrupted in this process (trained while the subprocesses start)."""
    killed = {
        case: run_values(tiny_gpt2_dir, workdir, workdir / "killed", run_name=case, **options)
        for case, options in CASES.items()
    }
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {
            case: pool.submit(_kill_after_first_checkpoint_then_resume, v, workdir)
            for case, v in killed.items()
        }
        for case, options in CASES.items():
            cfg = make_runner_config(
                **run_values(tiny_gpt2_dir, workdir, workdir / "uninterrupted", run_name=case, **options)
            )
            train_sae(cfg, model=tiny_gpt2, show_progress=False)
        outcomes = {case: future.result() for case, future in futures.items()}
    for case, facts in outcomes.items():
        facts["baseline_dir"] = workdir / "uninterrupted" / case
    return outcomes


@pytest.mark.parametrize("case", list(CASES))
def test_the_run_was_killed_between_checkpoints_and_resumed(
    case: str, resumed: dict[str, dict[str, Any]]
) -> None:
    facts = resumed[case]
    assert facts["killed_returncode"] == -signal.SIGKILL
    assert not facts["final_sae_at_kill"], "the run finished before it was killed; make it longer"
    assert facts["returncode"] == 0, facts["stderr"][-3000:]
    assert "Traceback" not in facts["stderr"]
    assert str(facts["run_dir"]) in facts["stdout"]


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_weights_are_bitwise_the_uninterrupted_run(
    case: str, resumed: dict[str, dict[str, Any]]
) -> None:
    facts = resumed[case]
    for filename in ("sae_weights.safetensors", "sparsity.safetensors"):
        want = load_file(facts["baseline_dir"] / filename)
        got = load_file(facts["run_dir"] / filename)
        assert set(got) == set(want)
        different = [name for name in want if not torch.equal(got[name], want[name])]
        assert not different, f"{case}: {filename} differs in {different}"
    assert json.loads((facts["run_dir"] / "cfg.json").read_text()) == json.loads(
        (facts["baseline_dir"] / "cfg.json").read_text()
    )


@pytest.mark.parametrize("case", list(CASES))
def test_the_resumed_metrics_log_is_the_uninterrupted_one(
    case: str, resumed: dict[str, dict[str, Any]]
) -> None:
    """The killed run's lines after the checkpoint are dropped and the resumed run logs the rest."""

    def lines(folder: Path) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]

    facts = resumed[case]
    want, got = lines(facts["baseline_dir"]), lines(facts["run_dir"])
    assert [row["step"] for row in got] == [row["step"] for row in want]
    assert got == want


@pytest.mark.parametrize("case", list(CASES))
def test_resuming_keeps_the_run_config(case: str, resumed: dict[str, dict[str, Any]]) -> None:
    facts = resumed[case]
    assert (facts["run_dir"] / "training_config.yaml").read_bytes() == facts["config_before"]


# -- in this process: damaged checkpoints, pruning, crashes ---------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tiny_gpt2: Any, tiny_gpt2_dir: Path, workdir: Path) -> Path:
    """A finished 40-step run with checkpoints at steps 10, 20 and 30."""
    values = run_values(
        tiny_gpt2_dir, workdir, workdir / "small", run_name="small", total_training_tokens=BATCH * 40, k=8
    )
    return train_sae(make_runner_config(**values), model=tiny_gpt2, show_progress=False).output_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def _truncate(checkpoint: Path) -> None:
    state = checkpoint / STATE_FILENAME
    state.write_bytes(state.read_bytes()[:-100])


def _edit_a_byte(checkpoint: Path) -> None:
    state = checkpoint / STATE_FILENAME
    data = bytearray(state.read_bytes())
    data[1000] ^= 0xFF
    state.write_bytes(bytes(data))


DAMAGES = {
    "truncated": (_truncate, "training_state.pt does not match its checksum"),
    "edited_byte": (_edit_a_byte, "training_state.pt does not match its checksum"),
    "no_manifest": (
        lambda checkpoint: (checkpoint / MANIFEST_FILENAME).unlink(),
        "is not a complete checkpoint",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resuming_from_a_damaged_checkpoint_is_refused_in_one_line(
    damage: str, small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_lens.cli import main

    run_dir = copy_of(small_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step_20"
    weights = (run_dir / "sae_weights.safetensors").read_bytes()
    spoil, message = DAMAGES[damage]
    spoil(checkpoint)
    capsys.readouterr()
    assert main(["train", "--resume_from_checkpoint", str(checkpoint), "--quiet"]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and stderr.startswith("sae-lens: error: "), stderr
    assert message in stderr and str(checkpoint) in stderr
    assert (run_dir / "sae_weights.safetensors").read_bytes() == weights


def test_keep_last_n_checkpoints_keeps_only_the_last_n(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, workdir: Path
) -> None:
    values = run_values(
        tiny_gpt2_dir,
        workdir,
        workdir / "pruned",
        run_name="pruned",
        total_training_tokens=BATCH * 40,
        n_checkpoints=4,  # steps 8, 16, 24, 32
        keep_last_n_checkpoints=2,
    )
    result = train_sae(make_runner_config(**values), model=tiny_gpt2, show_progress=False)
    folder = result.output_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_24", "step_32"]
    for step in (24, 32):
        assert read_checkpoint(folder / f"step_{step}")["manifest"]["step"] == step


def test_a_crash_while_writing_a_checkpoint_leaves_nothing_that_passes_for_one(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writer = SAETrainer.write_sae_folder
    calls: list[Path] = []

    def crash_on_the_second_checkpoint(self: SAETrainer, folder: Path) -> Path:
        calls.append(folder)
        if len(calls) == 2:
            real_writer(self, folder)  # the SAE's files are complete, the rest never comes
            raise OSError(28, "No space left on device")
        return real_writer(self, folder)

    monkeypatch.setattr(SAETrainer, "write_sae_folder", crash_on_the_second_checkpoint)
    values = run_values(
        tiny_gpt2_dir, workdir, workdir / "crashed", run_name="crashed", total_training_tokens=BATCH * 40
    )
    with pytest.raises(OSError, match="No space left"):
        train_sae(make_runner_config(**values), model=tiny_gpt2, show_progress=False)
    folder = workdir / "crashed" / "crashed" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_10"]  # no step_20, no temporary folder
    assert read_checkpoint(folder / "step_10")["manifest"]["step"] == 10
    with pytest.raises(SAELensError, match="not a complete checkpoint"):
        read_checkpoint(folder / "step_20")


def test_a_partial_last_line_in_the_metrics_log_does_not_stop_a_resume(
    small_run: Path, tiny_gpt2: Any, tmp_path: Path
) -> None:
    """SIGKILL can land in the middle of a log line; resuming must not trip over it."""
    from sae_lens.config import LanguageModelSAERunnerConfig

    run_dir = copy_of(small_run, tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 41, "loss": 0.1')
    cfg = LanguageModelSAERunnerConfig.from_yaml(
        run_dir / "training_config.yaml", resume_from_checkpoint=str(run_dir / "checkpoints" / "step_30")
    )
    result = train_sae(cfg, model=tiny_gpt2, show_progress=False)
    assert result.tokens_trained == BATCH * 40


def test_a_resume_does_not_silently_ignore_a_changed_learning_rate(
    small_run: Path, tiny_gpt2: Any, tmp_path: Path
) -> None:
    """`--resume_from_checkpoint X --lr 1000` must either train with lr 1000 (and diverge here) or be
    refused; continuing with the checkpoint's lr while the flag says otherwise is neither."""
    from sae_lens.config import LanguageModelSAERunnerConfig

    run_dir = copy_of(small_run, tmp_path)
    cfg = LanguageModelSAERunnerConfig.from_yaml(
        run_dir / "training_config.yaml",
        resume_from_checkpoint=str(run_dir / "checkpoints" / "step_10"),
        lr=1000.0,
    )
    with pytest.raises(SAELensError):
        train_sae(cfg, model=tiny_gpt2, show_progress=False)


# -- sweeps -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_run(tiny_gpt2: Any, tiny_gpt2_dir: Path, workdir: Path) -> dict[str, Any]:
    values = run_values(
        tiny_gpt2_dir,
        workdir,
        workdir / "sweep",
        run_name="sweep",
        total_training_tokens=BATCH * 40,
        k=[4, 8],
    )
    results = train_saes(make_runner_config(**values), model=tiny_gpt2, show_progress=False)
    return {"values": values, "results": results, "folder": workdir / "sweep" / "sweep"}


def test_a_sweep_resumed_from_python_is_bitwise_the_uninterrupted_sweep(
    sweep_run: dict[str, Any], tiny_gpt2: Any, tmp_path: Path
) -> None:
    run_dir = copy_of(sweep_run["folder"], tmp_path)
    cfg = make_runner_config(
        **{**sweep_run["values"], "resume_from_checkpoint": str(run_dir / "checkpoints" / "step_20")}
    )
    resumed = train_saes(cfg, model=tiny_gpt2, show_progress=False)
    assert [r.output_dir.name for r in resumed] == [r.output_dir.name for r in sweep_run["results"]]
    for before, after in zip(sweep_run["results"], resumed, strict=True):
        assert after.output_dir.parent == run_dir
        for name, tensor in before.sae.state_dict().items():
            assert torch.equal(after.sae.state_dict()[name], tensor), (after.output_dir.name, name)


def test_a_sweep_resumed_from_the_cli_reads_the_whole_sweep_from_its_folder(
    sweep_run: dict[str, Any],
) -> None:
    """With only `--resume_from_checkpoint`, the config comes from the run folder: for a sweep that
    must be the sweep (both SAEs), not the first SAE's own training_config.yaml."""
    from sae_lens.cli import build_parser, config_from_args

    checkpoint = sweep_run["folder"] / "checkpoints" / "step_20"
    cfg = config_from_args(build_parser().parse_args(["train", "--resume_from_checkpoint", str(checkpoint)]))
    assert [single.k for single in cfg.expand()] == [4, 8]
