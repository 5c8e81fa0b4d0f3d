"""Many SAEs from one forward pass (sae_lens/runner.py, `LanguageModelSAERunnerConfig.sweep`): list
values and hook patterns expand into one SAE per combination (deduplicated by what each
architecture uses), the model runs once per batch and only up to the deepest hooked block, every
SAE has its own state, log, folder and final eval, and a sweep trains the same SAEs as the single
runs of its configs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sae_lens.activations_store import ActivationsStore
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.runner import RunResult, _apply_memory_budget, _expand_hook_patterns, train_sae, train_saes
from tests.conftest import make_runner_config
from tests.integration.test_robustness import write_corpus

BATCH, STEPS = 256, 20


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Sweep-versus-single comparisons are bitwise: one thread, one reduction order."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("sweeps") / "corpus.txt", 4_000)


def values_for(tiny_gpt2_dir: Path, corpus: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_name": str(tiny_gpt2_dir),
        "hook_point": "blocks.0.hook_resid_post",
        "dataset_path": str(corpus),
        "context_size": 32,
        "train_batch_size": BATCH,
        "total_training_tokens": BATCH * STEPS,
        "n_eval_sequences": 4,
        "store_batch_size": 8,
        "n_batches_in_buffer": 4,
        "expansion_factor": 2,
        "wandb_log_frequency": 5,
        "checkpoint_path": str(out),
    }
    values.update(overrides)
    return values


# -- expansion ---------------------------------------------------------------------------------------------


def options_of(cfgs: list[LanguageModelSAERunnerConfig]) -> list[tuple[Any, ...]]:
    return [(c.architecture, c.sae_options.get("k"), c.sae_options.get("l1_coefficient"), c.lr) for c in cfgs]


def test_list_values_expand_into_their_product_in_order() -> None:
    cfg = make_runner_config(k=[16, 32], lr=[1e-3, 3e-4])
    assert cfg.sweep == {"k": [16, 32], "lr": [1e-3, 3e-4]}
    assert options_of(cfg.expand()) == [
        ("topk", 16, None, 1e-3),
        ("topk", 16, None, 3e-4),
        ("topk", 32, None, 1e-3),
        ("topk", 32, None, 3e-4),
    ]
    assert all(not single.sweep for single in cfg.expand())


def test_options_an_architecture_does_not_use_do_not_multiply_its_saes() -> None:
    cfg = make_runner_config(architecture=["topk", "standard"], k=[16, 32], l1_coefficient=[1.0, 2.0])
    singles = cfg.expand()
    # topk uses k only (2 SAEs), standard uses l1_coefficient only (2 SAEs): 4, not 8.
    used = [
        (c.architecture, c.sae_options["k"] if c.architecture == "topk" else c.sae_options["l1_coefficient"])
        for c in singles
    ]
    assert used == [("topk", 16), ("topk", 32), ("standard", 1.0), ("standard", 2.0)]
    assert len({c.identity() for c in singles}) == 4


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(SAELensError, match="k is an empty list"):
        make_runner_config(k=[])


def test_yaml_lists_and_comma_separated_flags_make_sweeps(tmp_path: Path) -> None:
    from sae_lens.cli import build_parser, config_from_args

    path = tmp_path / "sweep.yaml"
    path.write_text("hook_point: blocks.*.hook_resid_post\nk: [16, 32]\nlr: [0.001, 0.0003]\n")
    from_yaml = LanguageModelSAERunnerConfig.from_yaml(path)
    assert options_of(from_yaml.expand()) == options_of(
        make_runner_config(k=[16, 32], lr=[1e-3, 3e-4]).expand()
    )
    assert from_yaml.hook_point == "blocks.*.hook_resid_post"
    # A sweep saved as YAML reads back as the same sweep.
    from_yaml.to_yaml(tmp_path / "again.yaml")
    assert LanguageModelSAERunnerConfig.from_yaml(tmp_path / "again.yaml").sweep == from_yaml.sweep

    args = build_parser().parse_args(["train", "--k", "16,32", "--lr", "1e-3,3e-4"])
    from_flags = config_from_args(args)
    assert from_flags.sweep == {"k": [16, 32], "lr": [1e-3, 3e-4]}
    assert isinstance(from_flags.sweep["k"][0], int)
    # The flags' order (fields before options), not the command line's, decides the SAEs' order.
    assert sorted(options_of(from_flags.expand())) == sorted(options_of(from_yaml.expand()))


def test_fields_the_saes_must_share_are_checked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae_lens.runner

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("work started before the configs were checked")

    monkeypatch.setattr(sae_lens.runner, "load_text_dataset", forbidden)
    monkeypatch.setattr(sae_lens.runner, "load_model", forbidden)
    with pytest.raises(SAELensError, match=r"must agree on train_batch_size; train them in separate runs"):
        train_saes(make_runner_config(train_batch_size=[256, 512]))
    with pytest.raises(SAELensError, match=r"must agree on dataset_path, context_size"):
        train_saes(
            [make_runner_config(), make_runner_config(dataset_path="other.txt", context_size=64, k=16)]
        )


def test_hook_patterns_expand_to_the_blocks_in_numeric_order() -> None:
    names = [f"blocks.{i}.{hook}" for i in range(12) for hook in ("hook_resid_pre", "hook_resid_post")]
    model = SimpleNamespace(hook_dict=dict.fromkeys(["hook_embed", *names]))
    cfg = make_runner_config(hook_point="blocks.*.hook_resid_post", k=[16, 32])
    expanded = _expand_hook_patterns(cfg.expand(), model)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(12)]  # blocks.10 after blocks.9, not after blocks.1
    assert [(c.hook_point, c.k) for c in expanded] == [(h, 16) for h in hooks] + [(h, 32) for h in hooks]
    assert all(c.hook_layer == int(c.hook_point.split(".")[1]) for c in expanded)
    with pytest.raises(SAELensError, match=r"hook pattern 'blocks\.\*\.hook_nope' matches no hook"):
        _expand_hook_patterns(make_runner_config(hook_point="blocks.*.hook_nope").expand(), model)


# -- one forward pass per batch ------------------------------------------------------------------------------


@contextmanager
def watching(model: Any) -> Iterator[dict[str, Any]]:
    """Record every `run_with_cache` call of the bridge (the store's forward passes), and whether
    block 1 ran inside one of them."""
    seen: dict[str, Any] = {"calls": [], "block1_in_cache_pass": 0, "block0_in_cache_pass": 0}
    original = model.run_with_cache
    inside = [False]

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen["calls"].append((tuple(kwargs.get("names_filter") or ()), kwargs.get("stop_at_layer")))
        inside[0] = True
        try:
            return original(*args, **kwargs)
        finally:
            inside[0] = False

    def on_block(index: int) -> Any:
        def hook(*_: Any) -> None:
            if inside[0]:
                seen[f"block{index}_in_cache_pass"] += 1

        return hook

    handles = [model.blocks[i].register_forward_hook(on_block(i)) for i in (0, 1)]
    model.run_with_cache = counting
    try:
        yield seen
    finally:
        del model.run_with_cache  # back to the class's method
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def four_saes(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """Two hooks (a pattern) x two k: four SAEs in one run, and one single run for comparison."""
    out = tmp_path_factory.mktemp("four")
    sweep = make_runner_config(
        **values_for(
            tiny_gpt2_dir, corpus, out, hook_point="blocks.*.hook_resid_post", k=[4, 8], run_name="four"
        )
    )
    with watching(tiny_gpt2) as sweep_seen:
        results = train_saes(sweep, model=tiny_gpt2, show_progress=False)
    single = make_runner_config(**values_for(tiny_gpt2_dir, corpus, out, k=4, run_name="single"))
    with watching(tiny_gpt2) as single_seen:
        train_sae(single, model=tiny_gpt2, show_progress=False)
    return SimpleNamespace(results=results, sweep_seen=sweep_seen, single_seen=single_seen, out=out)


def k_of(result: RunResult) -> int:
    """The TopK SAE's k, from its saved config."""
    return int(result.sae.cfg.to_dict()["k"])


def test_a_pattern_and_a_list_give_four_saes_in_block_order(four_saes: Any) -> None:
    results: list[RunResult] = four_saes.results
    described = [(r.sae.cfg.metadata["hook_name"], k_of(r)) for r in results]
    # The list expands first, then each config's pattern, to the blocks in order.
    assert described == [
        ("blocks.0.hook_resid_post", 4),
        ("blocks.1.hook_resid_post", 4),
        ("blocks.0.hook_resid_post", 8),
        ("blocks.1.hook_resid_post", 8),
    ]
    assert all(
        r.sae.cfg.metadata["hook_layer"] == int(name.split(".")[1])
        for r, (name, _) in zip(results, described, strict=True)
    )


def test_the_model_runs_once_per_batch_for_all_saes(four_saes: Any) -> None:
    sweep_calls, single_calls = four_saes.sweep_seen["calls"], four_saes.single_seen["calls"]
    # Four SAEs cost the forward passes of one: the same number of store passes as the single run.
    assert len(sweep_calls) == len(single_calls) > STEPS * BATCH // (8 * 32)
    both = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    assert all(set(names) == set(both) and stop == 2 for names, stop in sweep_calls)


def test_every_sae_has_its_own_state_log_folder_and_final_eval(four_saes: Any) -> None:
    results: list[RunResult] = four_saes.results
    folders = [r.output_dir for r in results]
    assert len(set(folders)) == 4 and all(folder.parent == four_saes.out / "four" for folder in folders)
    finals = []
    for result in results:
        for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "training_config.yaml"):
            assert (result.output_dir / name).is_file(), (result.output_dir.name, name)
        lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines if "loss" in line] == [5, 10, 15, 20]
        final = [line for line in lines if "eval/explained_variance" in line][-1]
        assert final["step"] == STEPS
        # Its own log: the L0 logged is this SAE's k.
        assert {line["l0"] for line in lines if "l0" in line} == {float(k_of(result))}
        assert result.tokens_trained == STEPS * BATCH and 0 < result.metrics["explained_variance"] <= 1
        saved = LanguageModelSAERunnerConfig.from_yaml(result.output_dir / "training_config.yaml")
        assert saved.hook_point == result.sae.cfg.metadata["hook_name"] and saved.k == k_of(result)
        finals.append(final["eval/explained_variance"])
    assert len(set(finals)) == 4
    weights = [r.sae.W_dec.detach() for r in results]
    assert not any(torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))


# -- the model stops at the deepest hooked block, and a sweep is its single runs ----------------------------------


@pytest.fixture(scope="module")
def two_saes(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """A 2-SAE sweep on block 0 (k 4 and 8), and the single run of each of its configs."""
    out = tmp_path_factory.mktemp("two")
    values = values_for(tiny_gpt2_dir, corpus, out, k=[4, 8], run_name="sweep")
    with watching(tiny_gpt2) as seen:
        sweep = train_saes(make_runner_config(**values), model=tiny_gpt2, show_progress=False)
    singles = [
        train_sae(
            make_runner_config(**{**values, "k": k, "run_name": f"k{k}"}),
            model=tiny_gpt2,
            show_progress=False,
        )
        for k in (4, 8)
    ]
    return SimpleNamespace(sweep=sweep, singles=singles, seen=seen)


def test_the_model_stops_after_the_deepest_hooked_block(two_saes: Any) -> None:
    seen = two_saes.seen
    assert seen["calls"] and all(stop == 1 for _, stop in seen["calls"])
    assert seen["block0_in_cache_pass"] == len(seen["calls"])
    assert seen["block1_in_cache_pass"] == 0


def _same(a: RunResult, b: RunResult) -> list[str]:
    """Names of the tensors in which two SAEs differ."""
    theirs = b.sae.state_dict()
    return [name for name, tensor in a.sae.state_dict().items() if not torch.equal(tensor, theirs[name])]


def test_the_first_sae_of_a_sweep_is_bitwise_its_single_run(two_saes: Any) -> None:
    assert _same(two_saes.sweep[0], two_saes.singles[0]) == []
    assert two_saes.sweep[0].metrics == pytest.approx(two_saes.singles[0].metrics)


def test_every_sae_of_a_sweep_is_bitwise_its_single_run(two_saes: Any) -> None:
    """Each SAE's initial weights come from the seed alone, whatever its place in the sweep, so a
    sweep (or `distribute_saes`, where another rank builds it first) trains the same SAEs."""
    assert _same(two_saes.sweep[1], two_saes.singles[1]) == []


# -- the memory budget ---------------------------------------------------------------------------------------


def test_a_budget_below_two_batches_is_a_clear_error(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    cfg = make_runner_config(
        **values_for(
            tiny_gpt2_dir,
            corpus,
            tmp_path,
            hook_point="blocks.*.hook_resid_post",
            k=[4, 8],
            max_buffer_memory_mb=1,
            train_batch_size=4096,  # 4096 tokens x 128 floats = 2 MiB a batch
        )
    )
    with pytest.raises(
        SAELensError, match=r"max_buffer_memory_mb=1 holds fewer than 2 batches of 4096 tokens x 128"
    ):
        train_saes(cfg, model=tiny_gpt2, show_progress=False)


def test_the_budget_caps_the_buffer_of_all_hooks(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    # One batch is 512 tokens x 128 floats = 256 KiB; 2 MiB holds 8 of them. A store pass is 32 rows
    # of 48 tokens (1536 tokens, 768 KiB), which does not divide the buffer: refills in whole passes
    # must still stay within the budget.
    cfg = make_runner_config(
        **values_for(
            tiny_gpt2_dir,
            corpus,
            tmp_path,
            train_batch_size=512,
            context_size=48,
            store_batch_size=32,
            n_batches_in_buffer=32,
            max_buffer_memory_mb=2,
        )
    )
    store = ActivationsStore.from_config(tiny_gpt2, cfg, hook_points=hooks)
    _apply_memory_budget(store, cfg, {hook: 64 for hook in hooks})
    assert 2 <= store.n_batches_in_buffer <= 8
    peak = 0
    for _ in range(12):
        store.next_batch_by_hook()
        assert store._buffer is not None
        peak = max(peak, store._buffer.numel() * store._buffer.element_size())
    assert peak <= 2 * 2**20, f"the buffer held {peak / 2**20:.2f} MiB with max_buffer_memory_mb=2"
