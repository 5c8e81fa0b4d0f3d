"""`sae-lens train` (sae_lens/cli/train.py): parsing flags into a config, and the real command run as
a subprocess (`python -m sae_lens`), offline.

Every invocation is started up front by one module fixture and run a few at a time, since most of
the cost is each interpreter importing torch and loading all-MiniLM-L6-v2; the tests then check
the finished processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import datasets
import pytest
import yaml

TIMEOUT_S = 300
SMALL_RUN = [
    "--total_training_tokens", "4096",
    "--train_batch_size", "512",
    "--context_size", "32",
    "--n_eval_sequences", "4",
    "--n_batches_in_buffer", "4",
    "--hook_point", "blocks.1.hook_resid_post",
]  # fmt: skip

# name -> (arguments after `train`, a fragment the one-line error must contain).
# {data} and {foo} are replaced by files the `workdir` fixture writes.
USAGE_ERRORS: dict[str, tuple[list[str], str]] = {
    "unknown_flag": (["--lrr", "1e-3"], "did you mean --lr?"),
    "negative_lr": (["--lr", "-1"], "lr must be positive"),
    "zero_context": (["--context_size", "0"], "context_size must be a positive integer"),
    "bad_architecture": (["--architecture", "nope"], "architecture must be one of"),
    "missing_config": (["--config", "missing.yaml"], "'missing.yaml' does not exist"),
    # A block past the model's last is refused from its config, before the model loads.
    "bad_hook_point": (
        ["--hook_point", "blocks.9.hook_resid_post", "--dataset_path", "{data}"],
        "has 6 blocks (blocks.0-5)",
    ),
    "missing_dataset": (["--dataset_path", "/nonexistent/file.txt"], "does not exist"),
    "unknown_builtin": (["--dataset_path", "builtin:nope"], "builtin:python-docs"),
    "no_text_column": (["--dataset_path", "{foo}"], "no usable document column"),
    "d_in_mismatch": (["--d_in", "100", "--dataset_path", "{data}", *SMALL_RUN], "d_in=100"),
}


def _cli_env() -> dict[str, str]:
    # os.environ already carries the session's offline settings (see conftest.offline_env).
    env = dict(os.environ)
    env.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    env.pop("SAE_LENS_DEBUG", None)
    return env


def _console_script() -> str | None:
    found = shutil.which("sae-lens")
    if found:
        return found
    beside = Path(sys.executable).with_name("sae-lens")
    return str(beside) if beside.is_file() else None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The subprocesses' working directory, holding the data and config files they read."""
    folder = tmp_path_factory.mktemp("cli")
    texts = list(topics.values())
    (folder / "topics.txt").write_text("\n\n".join(texts[:20]))
    datasets.Dataset.from_dict({"text": texts[20:40]}).save_to_disk(str(folder / "topics_saved"))
    datasets.Dataset.from_dict({"foo": ["no text column here", "nor here"]}).save_to_disk(str(folder / "foo"))
    run_config = {
        "dataset_path": str(folder / "topics_saved"),
        "hook_point": "blocks.0.hook_resid_post",
        "architecture": "standard",
        "expansion_factor": 2,
        "lr": 1e-3,
        "total_training_tokens": 2048,
        "train_batch_size": 256,
        "context_size": 32,
        "n_eval_sequences": 2,
        "n_batches_in_buffer": 4,
        "store_batch_size": 8,
        "checkpoint_path": str(folder / "yaml_out"),
        "run_name": "from_yaml",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(run_config))
    return folder


def _expand(args: list[str], workdir: Path) -> list[str]:
    files = {"data": "topics.txt", "foo": "foo"}
    return [arg.format(**{k: str(workdir / v) for k, v in files.items()}) for arg in args]


@pytest.fixture(scope="module")
def results(workdir: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every CLI invocation of this module, run three at a time, the two training runs first."""
    module = [sys.executable, "-m", "sae_lens", "train"]
    commands: dict[str, list[str]] = {}
    commands["success"] = [
        *module,
        "--dataset_path", str(workdir / "topics.txt"),
        *SMALL_RUN,
        "--checkpoint_path", str(workdir / "runs"),
        "--run_name", "cli",
        "--quiet",
    ]  # fmt: skip
    commands["yaml"] = [*module, "--config", "run.yaml", "--lr", "5e-4", "--quiet"]
    commands.update({name: module + _expand(args, workdir) for name, (args, _) in USAGE_ERRORS.items()})
    commands["debug"] = [*module, "--context_size", "0", "--debug"]
    script = _console_script()
    if script is not None:
        commands["console_script"] = [script, "train", "--lrr", "1e-3"]
    env = _cli_env()

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run, command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_line_and_exit_2(
    case: str, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = results[case]
    expected = USAGE_ERRORS[case][1]
    stderr = result.stderr.strip()
    assert result.returncode == 2, stderr
    assert "Traceback" not in result.stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("sae-lens: error: "), stderr
    assert expected in stderr


def test_unknown_hook_point_lists_valid_hooks(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    stderr = results["bad_hook_point"].stderr
    assert "6 blocks" in stderr
    assert "block 9" in stderr and "pick a hook in one of them" in stderr


def test_debug_shows_the_traceback(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = results["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "SAELensError" in result.stderr
    assert "context_size must be a positive integer" in result.stderr


def test_small_run_succeeds_and_prints_a_summary(
    results: dict[str, subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    result = results["success"]
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for label in ("L0", "explained variance", "dead fraction", "embedding_cosine_score"):
        assert label in out, out
    folder = workdir / "runs" / "cli"
    assert str(folder) in out
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "metrics.jsonl"):
        assert (folder / name).is_file(), name
    saved = yaml.safe_load((folder / "training_config.yaml").read_text())
    assert saved["total_training_tokens"] == 4096
    assert saved["context_size"] == 32
    assert "Traceback" not in result.stderr


def test_config_file_with_a_flag_override(
    results: dict[str, subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    result = results["yaml"]
    assert result.returncode == 0, result.stderr[-3000:]
    folder = workdir / "yaml_out" / "from_yaml"
    assert str(folder) in result.stdout
    saved = yaml.safe_load((folder / "training_config.yaml").read_text())
    assert saved["lr"] == pytest.approx(5e-4)  # the flag wins over the file's 1e-3 ...
    assert saved["architecture"] == "standard"  # ... and the file wins over the defaults
    assert saved["total_training_tokens"] == 2048
    assert saved["hook_point"] == "blocks.0.hook_resid_post"
    assert (folder / "sae_weights.safetensors").is_file()


def test_console_script(results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    if "console_script" not in results:
        pytest.skip("the sae-lens console script is not installed; python -m sae_lens is tested instead")
    result = results["console_script"]
    assert result.returncode == 2
    assert result.stderr.strip() == "sae-lens: error: unknown config key 'lrr'; did you mean --lr?"


# -- parsing, in this process (no training) -----------------------------------------------------------


def parse(*argv: str) -> Any:
    from sae_lens.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_architecture_option_flags_go_to_sae_options() -> None:
    cfg = parse("--k", "16", "--l1_coefficient", "0.01")
    assert cfg.sae_options["k"] == 16 and isinstance(cfg.sae_options["k"], int)
    assert cfg.sae_options["l1_coefficient"] == pytest.approx(0.01)
    assert cfg.k == 16 and cfg.architecture == "topk"
    standard = parse("--architecture", "standard", "--l1_coefficient", "5e-3", "--use_ghost_grads")
    assert standard.sae_options["l1_coefficient"] == pytest.approx(5e-3)
    assert standard.sae_options["use_ghost_grads"] is True
    widths = parse("--architecture", "matryoshka_batchtopk", "--d_sae", "64", "--matryoshka_widths", "16,64")
    assert widths.sae_options["matryoshka_widths"] == [16, 64]


def test_field_flags_are_typed_and_defaults_stay() -> None:
    cfg = parse("--lr", "3e-4", "--total_training_tokens", "1e6", "--streaming", "--hook_point_layer", "none")
    assert cfg.lr == pytest.approx(3e-4) and cfg.total_training_tokens == 1_000_000
    assert cfg.streaming is True and cfg.hook_point_layer is None
    assert parse() == parse("--architecture", "topk")  # no flags: the defaults (the main job)


def test_flags_override_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("architecture: standard\nl1_coefficient: 0.5\nlr: 0.01\n")
    cfg = parse("--config", str(path), "--l1_coefficient", "0.25")
    assert cfg.architecture == "standard" and cfg.lr == 0.01
    assert cfg.sae_options["l1_coefficient"] == 0.25


def test_help_lists_every_architecture_option(capsys: pytest.CaptureFixture[str]) -> None:
    from sae_lens.cli import build_parser
    from sae_lens.saes import get_architecture_class, registered_architectures

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name in registered_architectures():
        for option_name in get_architecture_class(name).config_class.option_names():
            assert f"--{option_name}" in text, option_name
    assert "SAE options: all architectures" in text and "SAE options: jumprelu" in text


def test_an_unknown_flag_suggests_the_closest_option(capsys: pytest.CaptureFixture[str]) -> None:
    from sae_lens.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--jumprelu_bandwith", "0.1"])
    assert info.value.code == 2
    assert "did you mean --jumprelu_bandwidth?" in capsys.readouterr().err


def test_the_summary_reports_the_decoder_refit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from sae_lens.cli.train import _print_summary
    from sae_lens.runner import RunResult

    refit = {"tokens": 131072.0, "seconds": 2.25, "held_out_explained_variance_before": 0.861}
    refit["held_out_explained_variance"] = 0.878
    result = RunResult(sae=None, output_dir=tmp_path, metrics={"l0": 32.0}, decoder_refit=refit)  # type: ignore[arg-type]
    _print_summary(result, tmp_path / "report.html")
    out = capsys.readouterr().out
    assert (
        "  decoder refit       on the last 131,072 tokens in 2.2 s, held-out explained variance 0.861 -> 0.878"
        in out
    )
    _print_summary(RunResult(sae=None, output_dir=tmp_path), tmp_path / "report.html")  # type: ignore[arg-type]
    assert "decoder refit" not in capsys.readouterr().out
