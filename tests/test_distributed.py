"""Data parallelism (sae_lens/distributed.py and its use by the trainer and the runner), on two CPU
processes talking gloo.

One spawn of two ranks runs every distributed check (the interpreters' start-up is most of the
cost): the collectives; `SAETrainer.fit` on each rank's half of every global batch, which must give
the single-process result on the whole batches (topk and standard, geometric-median and mean b_dec,
with and without input normalisation); and the runner end to end: a 2-SAE sweep with every SAE on
every rank, then the same sweep with `distribute_saes` (each SAE on one rank, trained on the batches
of both), and a resume of the latter from its checkpoint. Without a process group every function is
a no-op, which the first tests check in this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_lens import distributed
from sae_lens.saes import SparseAutoencoder
from sae_lens.training import SAETrainer
from sae_lens.training.checkpoint import read_checkpoint
from tests.conftest import _sparse_data, make_runner_config, tiny_corpus_words

WORLD = 2
HALF, STEPS = 64, 12  # rows per rank per step; the single process takes 2 * HALF
TIMEOUT_S = 240
TRAINER_CASES: dict[str, dict[str, Any]] = {
    "topk-median": {"architecture": "topk", "k": 4, "b_dec_init_method": "geometric_median"},
    "topk-mean-normalized": {
        "architecture": "topk",
        "k": 4,
        "b_dec_init_method": "mean",
        "normalize_activations": "expected_average_only_in",
    },
    "standard-median-normalized": {
        "architecture": "standard",
        "l1_coefficient": 0.05,
        "b_dec_init_method": "geometric_median",
        "normalize_activations": "expected_average_only_in",
    },
    "standard-mean": {"architecture": "standard", "l1_coefficient": 0.05, "b_dec_init_method": "mean"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The single-process references run here with one thread, as the ranks do."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- without a process group -------------------------------------------------------------------------------


def test_without_torchrun_every_function_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False and not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    rows = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(rows) is rows
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.any_rank(False) is False and distributed.all_ranks(True) is True
    assert distributed.max_of(2.5) == 2.5 and distributed.mean_of(2.5) == 2.5
    data = [{"text": str(i)} for i in range(5)]
    assert distributed.shard_dataset(data) is data
    assert distributed.local_device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is False


def test_under_torchrun_the_steps_count_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """total_training_tokens is global: each step trains world_size * train_batch_size tokens."""
    cfg = make_runner_config(train_batch_size=100, total_training_tokens=1000)
    assert cfg.total_training_steps == 10
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert cfg.total_training_steps == 5


# -- what each rank runs ---------------------------------------------------------------------------------------


def global_batches() -> list[torch.Tensor]:
    """The global batches `[2 * HALF, 16]`, far from unit norm so that the input scale matters."""
    return [3.0 * _sparse_data(WORLD * HALF, seed=step) for step in range(STEPS)]


def trainer_config(case: str, train_batch_size: int) -> Any:
    return make_runner_config(
        d_in=16,
        d_sae=64,
        lr=3e-3,
        train_batch_size=train_batch_size,
        total_training_tokens=WORLD * HALF * STEPS,
        **TRAINER_CASES[case],
    )


def train_on(case: str, batches: list[torch.Tensor], train_batch_size: int) -> dict[str, torch.Tensor]:
    cfg = trainer_config(case, train_batch_size)
    torch.manual_seed(0)
    trainer = SAETrainer(cfg, SparseAutoencoder(cfg), show_progress=False)
    trainer.fit(batches)
    assert trainer.n_steps == STEPS and trainer.n_tokens == WORLD * HALF * STEPS
    return {**trainer.sae.state_dict(), "fire_counts": trainer.state.fire_counts.clone()}


def _collectives(rank: int) -> dict[str, Any]:
    from datasets import Dataset

    rows = torch.full((2, 3), float(rank))
    flat = torch.tensor([1.0 + rank])
    rows_dataset = Dataset.from_dict({"text": [f"doc {i}" for i in range(10)]})
    return {
        "identity": (distributed.is_distributed(), distributed.rank(), distributed.world_size()),
        "main": distributed.is_main_process(),
        "gather_rows": distributed.gather_rows(rows),
        "gather_objects": distributed.gather_objects(f"from {rank}"),
        "any": (distributed.any_rank(rank == 1), distributed.any_rank(False)),
        "all": (distributed.all_ranks(rank == 1), distributed.all_ranks(True)),
        "max": (distributed.max_of(float(rank)), distributed.max_of(float("nan") if rank == 1 else 1.0)),
        "mean": distributed.mean_of(float(rank)),
        "sum": distributed.sum_(flat),
        "shard_dataset": [row["text"] for row in distributed.shard_dataset(rows_dataset)],
        "shard_list": [
            row["text"] for row in distributed.shard_dataset([{"text": str(i)} for i in range(7)])
        ],
    }


def runner_values(paths: dict[str, str], name: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_name": paths["model"],
        "hook_point": "blocks.0.hook_resid_post",
        "dataset_path": paths["corpus"],
        "context_size": 32,
        "train_batch_size": 128,  # per rank: 256 tokens a step
        "total_training_tokens": 256 * 30,
        "n_eval_sequences": 4,
        "store_batch_size": 8,
        "n_batches_in_buffer": 4,
        "expansion_factor": 2,
        "k": [4, 8],
        # Longer than the run: no latent counts as dead, so AuxK stays off. Each rank normalises its
        # AuxK by its own residual's variance, which is not exactly the gathered batch's, and these
        # tests compare data-parallel training with one rank training on the gathered batches.
        "dead_feature_window": 50,
        # Off for the same reason: whether the closing decoder refit is kept is decided on the
        # owning rank's held-out rows, and ranks hold out different rows. (The torchrun CLI run
        # below refits, across ranks.)
        "decoder_refit_tokens": 0,
        "wandb_log_frequency": 5,
        "n_checkpoints": 1,
        "checkpoint_path": paths[name],
        "run_name": name,
    }
    values.update(overrides)
    return values


def _runner(rank: int, paths: dict[str, str]) -> dict[str, Any]:
    from sae_lens.models import load_model
    from sae_lens.runner import train_saes

    model = load_model(paths["model"])
    out: dict[str, Any] = {}
    for name, spread in (("every_rank", False), ("distributed", True)):
        cfg = make_runner_config(**runner_values(paths, name, distribute_saes=spread))
        results = train_saes(cfg, model=model, show_progress=False)
        out[name] = {
            r.output_dir.name: {"tokens": r.tokens_trained, "weights": r.sae.state_dict()} for r in results
        }
    # Resume the distributed sweep from its checkpoint (step 15 of 30), into a copy of its folder.
    import shutil

    copy = Path(paths["resumed"]) / "resumed"
    if rank == 0:
        shutil.copytree(Path(paths["distributed"]) / "distributed", copy)
    distributed.all_ranks(True)  # a barrier: the copy exists before any rank reads it
    cfg = make_runner_config(
        **runner_values(paths, "distributed", distribute_saes=True),
        resume_from_checkpoint=str(copy / "checkpoints" / "step_15"),
    )
    try:
        results = train_saes(cfg, model=model, show_progress=False)
        out["resumed"] = {r.output_dir.name: {"weights": r.sae.state_dict()} for r in results}
    except Exception as error:
        out["resumed"] = {"error": f"{type(error).__name__}: {error}"}
    # Last, since a rank that fails here leaves the other waiting in a collective until the
    # connection closes: one SAE spread over two ranks, so rank 1 has none of its own.
    try:
        cfg = make_runner_config(**runner_values(paths, "idle", k=8, n_checkpoints=0, distribute_saes=True))
        out["idle"] = {
            "names": [r.output_dir.name for r in train_saes(cfg, model=model, show_progress=False)]
        }
    except Exception as error:
        out["idle"] = {"error": f"{type(error).__name__}: {error}"}
    return out


def _worker(rank: int, port: int, paths: dict[str, str]) -> None:
    """One rank: join the group, run every check, save what it found for the test to read."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    found: dict[str, Any] = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=90),
        )
        found["collectives"] = _collectives(rank)
        found["trainer"] = {}
        for case in TRAINER_CASES:
            halves = [batch[rank * HALF : (rank + 1) * HALF] for batch in global_batches()]
            found["trainer"][case] = train_on(case, halves, HALF)
        found["runner"] = _runner(rank, paths)
    except BaseException:
        found["error"] = traceback.format_exc()
    torch.save(found, Path(paths["results"]) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    words = tiny_corpus_words(6_000, seed=4)
    text = "\n\n".join(" ".join(words[i : i + 160]) for i in range(0, len(words), 160))
    (folder / "corpus.txt").write_text(text)
    return folder


def _start_torchrun(tiny_gpt2_dir: Path, root: Path, name: str, **overrides: Any) -> subprocess.Popen[str]:
    """`torchrun --nproc_per_node 2 -m sae_lens train ...` writing `root/name/name`."""
    from tests.integration.test_robustness import cli_args, cli_env

    paths = {"model": str(tiny_gpt2_dir), "corpus": str(root / "corpus.txt"), name: str(root / name)}
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "sae_lens",
        "train",
        *cli_args(runner_values(paths, name, k=8, **overrides)),
        "--quiet",
    ]
    return subprocess.Popen(
        command, cwd=root, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def torchrun(tiny_gpt2_dir: Path, root: Path) -> subprocess.Popen[str]:
    """A whole CLI run under torchrun, started here and left running while the spawned ranks work
    (the test that reads it waits for it)."""
    # With the decoder refit (off in `runner_values`): its equations are summed across the ranks.
    return _start_torchrun(tiny_gpt2_dir, root, "torchrun", decoder_refit_tokens=131072)


@pytest.fixture(scope="module")
def torchrun_sigterm(tiny_gpt2_dir: Path, root: Path) -> tuple[subprocess.Popen[str], threading.Thread]:
    """A long CLI run under torchrun, sent SIGTERM (as a scheduler would send it to the launcher) as
    soon as it has logged a step; a thread watches for that."""
    process = _start_torchrun(
        tiny_gpt2_dir,
        root,
        "sigterm",
        total_training_tokens=10**9,
        n_checkpoints=0,
        wandb_log_frequency=1,
        eval_every_n_wandb_logs=10**6,
    )
    metrics = root / "sigterm" / "sigterm" / "metrics.jsonl"

    def signal_when_training() -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            if process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)

    watcher = threading.Thread(target=signal_when_training, daemon=True)
    watcher.start()
    return process, watcher


@pytest.fixture(scope="module")
def ranks(
    tiny_gpt2_dir: Path,
    root: Path,
    torchrun: subprocess.Popen[str],
    torchrun_sigterm: tuple[subprocess.Popen[str], threading.Thread],
) -> list[dict[str, Any]]:
    """What each of the two ranks found (the torchrun runs go on meanwhile)."""
    paths = {"model": str(tiny_gpt2_dir), "corpus": str(root / "corpus.txt")}
    for name in ("results", "every_rank", "distributed", "resumed", "idle"):
        (root / name).mkdir()
        paths[name] = str(root / name)
    context = mp.start_processes(
        _worker, args=(_free_port(), paths), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish in time (a collective left waiting?)")
    found = [torch.load(root / "results" / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for rank, result in enumerate(found):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    for result in found:
        result["root"] = root
    return found


# -- the checks ----------------------------------------------------------------------------------------------------


def test_the_collectives(ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ranks):
        found = result["collectives"]
        assert found["identity"] == (True, rank, WORLD) and found["main"] == (rank == 0)
        assert torch.equal(found["gather_rows"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        assert found["gather_objects"] == ["from 0", "from 1"]
        assert found["any"] == (True, False) and found["all"] == (False, True)
        assert found["max"][0] == 1.0 and found["max"][1] != found["max"][1]  # NaN anywhere wins
        assert found["mean"] == 0.5 and torch.equal(found["sum"], torch.tensor([3.0]))
    for key, n in (("shard_dataset", 10), ("shard_list", 7)):
        shards = [set(result["collectives"][key]) for result in ranks]
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == n, key
    assert ranks[0]["collectives"]["shard_list"] == ["0", "2", "4", "6"]


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_two_ranks_on_halves_train_the_single_process_sae_on_whole_batches(
    case: str, ranks: list[dict[str, Any]]
) -> None:
    single = train_on(case, global_batches(), WORLD * HALF)
    for rank, result in enumerate(ranks):
        trained = result["trainer"][case]
        assert set(trained) == set(single)
        for name, tensor in single.items():
            torch.testing.assert_close(
                trained[name], tensor, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}"
            )
    # Both ranks took the same steps from the same all-reduced gradients: identical SAEs.
    for name, tensor in ranks[0]["trainer"][case].items():
        assert torch.equal(ranks[1]["trainer"][case][name], tensor), name


def test_every_sae_on_every_rank_writes_one_run_folder_from_rank_0(ranks: list[dict[str, Any]]) -> None:
    folder = ranks[0]["root"] / "every_rank" / "every_rank"
    names = ["00-k=4", "01-k=8"]
    # The sweep's own config sits beside its SAE folders: `--resume_from_checkpoint` reads it.
    assert sorted(p.name for p in folder.iterdir()) == sorted(["checkpoints", "training_config.yaml", *names])
    for name in names:
        for result in ranks:
            assert result["runner"]["every_rank"][name]["tokens"] == 256 * 30
        steps = [
            json.loads(line)["step"] for line in (folder / name / "metrics.jsonl").read_text().splitlines()
        ]
        logged = [step for step in steps if step % 5 == 0]
        assert sorted(set(logged)) == [5, 10, 15, 20, 25, 30]
        # One writer: each step's training line appears once (rank 1 logs nothing).
        lines = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
        assert len([line for line in lines if "loss" in line]) == 6
        for rank in (0, 1):
            for key, tensor in ranks[0]["runner"]["every_rank"][name]["weights"].items():
                assert torch.equal(ranks[rank]["runner"]["every_rank"][name]["weights"][key], tensor), key
    # Each rank streamed its own shard of the documents: their store positions differ.
    checkpoint = read_checkpoint(folder / "checkpoints" / "step_15")
    buffers = [store["buffer"] for store in checkpoint["stores"]]
    assert len(buffers) == WORLD and not torch.equal(buffers[0], buffers[1])


def assert_same_training(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """The same SAE up to float reordering: data-parallel training averages per-rank gradients
    where one rank sums the gathered batch, and over 30 steps a rounding-level difference can move
    a single weight of a latent that was near a top-k tie by ~3e-4. So: every element within 1e-3,
    and at most 0.1% of them outside rtol 1e-4 / atol 1e-5."""
    difference = (got - want).abs()
    assert float(difference.max()) <= 1e-3, (name, float(difference.max()))
    outside = difference > 1e-5 + 1e-4 * want.abs()
    assert float(outside.float().mean()) <= 1e-3, (name, int(outside.sum()), outside.numel())


def test_distribute_saes_trains_each_sae_on_one_rank_on_the_batches_of_both(
    ranks: list[dict[str, Any]],
) -> None:
    folder = ranks[0]["root"] / "distributed" / "distributed"
    assert list(ranks[0]["runner"]["distributed"]) == ["00-k=4"]
    assert list(ranks[1]["runner"]["distributed"]) == ["01-k=8"]
    for rank, name in enumerate(["00-k=4", "01-k=8"]):
        assert ranks[rank]["runner"]["distributed"][name]["tokens"] == 256 * 30
        assert (folder / name / "sae_weights.safetensors").is_file()
    # The first SAE is built first on rank 0 either way: the same SAE as with every SAE on every rank.
    spread = ranks[0]["runner"]["distributed"]["00-k=4"]["weights"]
    for key, tensor in ranks[0]["runner"]["every_rank"]["00-k=4"]["weights"].items():
        assert_same_training(spread[key], tensor, key)


def test_distribute_saes_does_not_change_the_saes_trained(ranks: list[dict[str, Any]]) -> None:
    """Spreading a sweep over ranks is a speed setting: the second SAE, built first on rank 1, must
    still be the one the undistributed sweep trains."""
    spread = ranks[1]["runner"]["distributed"]["01-k=8"]["weights"]
    for key, tensor in ranks[0]["runner"]["every_rank"]["01-k=8"]["weights"].items():
        assert_same_training(spread[key], tensor, key)


def test_a_distribute_saes_checkpoint_holds_every_sae(ranks: list[dict[str, Any]]) -> None:
    checkpoint = ranks[0]["root"] / "distributed" / "distributed" / "checkpoints" / "step_15"
    state = read_checkpoint(checkpoint)
    assert sorted(state["trainers"]) == ["00-k=4", "01-k=8"]
    assert sorted(state["manifest"]["saes"]) == ["00-k=4", "01-k=8"]
    for name in ("00-k=4", "01-k=8"):
        SparseAutoencoder.load_from_disk(checkpoint / "saes" / name)


def test_a_distribute_saes_sweep_resumes_from_its_checkpoint(ranks: list[dict[str, Any]]) -> None:
    for rank, name in enumerate(["00-k=4", "01-k=8"]):
        resumed = ranks[rank]["runner"]["resumed"]
        assert "error" not in resumed, resumed.get("error")
        want = ranks[rank]["runner"]["distributed"][name]["weights"]
        for key, tensor in want.items():
            assert torch.equal(resumed[name]["weights"][key], tensor), (name, key)


def test_torchrun_trains_from_the_cli_with_one_writer(
    torchrun: subprocess.Popen[str], ranks: list[dict[str, Any]], root: Path
) -> None:
    out, err = torchrun.communicate(timeout=TIMEOUT_S)
    assert torchrun.returncode == 0, err[-3000:]
    folder = root / "torchrun" / "torchrun"
    assert out.count("Summary (held-out tokens): torchrun") == 1  # rank 0 reports, rank 1 stays quiet
    assert "tokens trained      7,680" in out
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [5, 10, 15, 20, 25, 30]
    stores = read_checkpoint(folder / "checkpoints" / "step_15")["stores"]
    assert len(stores) == WORLD and not torch.equal(stores[0]["buffer"], stores[1]["buffer"])
    SparseAutoencoder.load_from_disk(folder)


def test_distribute_saes_with_fewer_saes_than_ranks_does_not_crash_the_idle_rank(
    ranks: list[dict[str, Any]],
) -> None:
    """One SAE on two ranks: refused on every rank in one line, or trained on rank 0 with rank 1
    feeding it batches; an IndexError on the rank that owns no SAE is neither."""
    outcomes = [result["runner"]["idle"] for result in ranks]
    errors = [outcome.get("error") for outcome in outcomes]
    if any(errors):
        assert all(error and error.startswith("SAELensError") for error in errors), errors
    else:
        assert outcomes[0]["names"] == ["idle"] and outcomes[1]["names"] == []


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_one_save(
    torchrun_sigterm: tuple[subprocess.Popen[str], threading.Thread], ranks: list[dict[str, Any]], root: Path
) -> None:
    process, watcher = torchrun_sigterm
    watcher.join(timeout=TIMEOUT_S)
    _, err = process.communicate(timeout=TIMEOUT_S)
    folder = root / "sigterm" / "sigterm"
    # torchrun forwards the signal to its ranks; they agree to stop after the same step.
    reports = [line for line in err.splitlines() if line.startswith("sae-lens: interrupted by SIGTERM")]
    steps = {line.split(" after step ")[1].split(";")[0] for line in reports}
    assert len(steps) == 1, reports
    step = steps.pop()
    checkpoint = folder / "checkpoints" / f"step_{step}"
    state = read_checkpoint(checkpoint)
    assert len(state["stores"]) == WORLD and state["manifest"]["step"] == int(step)
    SparseAutoencoder.load_from_disk(folder)
    # Rank 0 saved and says where; the other rank, which saves nothing, has nothing to report.
    assert reports == [
        f"sae-lens: interrupted by SIGTERM after step {step}; saved the SAE trained so far to {folder} and a "
        f"resumable checkpoint to {checkpoint} (resume with --resume_from_checkpoint)"
    ]
