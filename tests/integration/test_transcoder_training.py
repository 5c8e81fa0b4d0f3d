"""Training a transcoder with the runner (`hook_point_out`): it reads `blocks.0.hook_resid_mid` and
reconstructs `blocks.0.hook_mlp_out` of the tiny GPT-2, with and without a skip connection. Its
output's explained variance rises with training; the folder says what it reads and writes and loads
back exactly; it splices into `HookedSAETransformer` at its output hook; `run_evals` scores it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sae_lens.errors import SAELensError
from sae_lens.eval_runner import EvalConfig, run_evals
from sae_lens.evals import eval_excluded_token_ids, explained_variance
from sae_lens.hooked_sae_transformer import HookedSAETransformer
from sae_lens.runner import RunResult, train_sae
from sae_lens.saes import SparseAutoencoder
from tests.conftest import make_runner_config
from tests.integration.test_robustness import write_corpus

HOOK_IN, HOOK_OUT = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("transcoder") / "corpus.txt", 6_000)


def transcoder_values(tiny_gpt2_dir: Path, corpus: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_name": str(tiny_gpt2_dir),
        "hook_point": HOOK_IN,
        "hook_point_out": HOOK_OUT,
        "dataset_path": str(corpus),
        "architecture": "topk",
        "k": 8,
        "expansion_factor": 4,
        "lr": 3e-3,
        "context_size": 32,
        "train_batch_size": 256,
        "total_training_tokens": 256 * 60,
        "n_eval_sequences": 4,
        "store_batch_size": 8,
        "n_batches_in_buffer": 4,
        "wandb_log_frequency": 10,
        "eval_every_n_wandb_logs": 1,
        "checkpoint_path": str(out),
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "skip"])
def trained(
    request: pytest.FixtureRequest,
    tiny_gpt2: Any,
    tiny_gpt2_dir: Path,
    corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Any, RunResult]:
    skip = request.param
    cfg = make_runner_config(
        **transcoder_values(
            tiny_gpt2_dir,
            corpus,
            tmp_path_factory.mktemp("tc"),
            skip_connection=skip,
            run_name=f"skip-{skip}",
        )
    )
    return cfg, train_sae(cfg, model=tiny_gpt2, show_progress=False)


@pytest.fixture(scope="module")
def clean(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The held-out rows' input and output hook activations, `[16, 32, 64]` each."""
    assert {HOOK_IN, HOOK_OUT} <= set(tiny_gpt2.hook_dict)
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(tiny_gpt2_tokens, names_filter=[HOOK_IN, HOOK_OUT])
    return {HOOK_IN: cache[HOOK_IN], HOOK_OUT: cache[HOOK_OUT]}


def test_training_raises_the_explained_variance_of_the_output(
    trained: tuple[Any, RunResult], clean: dict[str, torch.Tensor]
) -> None:
    cfg, result = trained
    x, target = clean[HOOK_IN].flatten(0, 1), clean[HOOK_OUT].flatten(0, 1)
    torch.manual_seed(cfg.seed)
    untrained = SparseAutoencoder.from_config(cfg.sae_config(64, d_out=64))
    with torch.no_grad():
        before = explained_variance(target, untrained(x))
        after = explained_variance(target, result.sae(x))
    assert after > 0.5 and after > before + 0.4, (before, after)
    # The run's own evaluations (held-out rows of the corpus) rise too, ending where the result says.
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval/explained_variance"] for line in lines if "eval/explained_variance" in line]
    assert len(evals) >= 3 and evals[-1] > evals[0]
    assert evals[-1] == pytest.approx(result.metrics["explained_variance"])
    assert 0 < result.metrics["l0"] <= 8


def test_the_folder_says_what_it_reads_and_writes(trained: tuple[Any, RunResult]) -> None:
    cfg, result = trained
    saved = json.loads((result.output_dir / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == HOOK_IN
    assert saved["metadata"]["hook_name_out"] == HOOK_OUT
    assert saved["apply_b_dec_to_input"] is False
    assert saved["d_in"] == 64 and saved["d_out"] == 64 and saved["d_sae"] == 256
    assert saved["skip_connection"] is cfg.skip_connection
    weights = load_file(result.output_dir / "sae_weights.safetensors")
    assert ("W_skip" in weights) is cfg.skip_connection
    if cfg.skip_connection:
        assert weights["W_skip"].shape == (64, 64) and weights["W_skip"].abs().sum() > 0


def test_it_loads_back_with_identical_outputs(
    trained: tuple[Any, RunResult], clean: dict[str, torch.Tensor]
) -> None:
    _, result = trained
    loaded = SparseAutoencoder.load_from_disk(result.output_dir)
    assert loaded.cfg.is_transcoder and type(loaded) is type(result.sae)
    x = clean[HOOK_IN]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.sae(x))
        assert torch.equal(loaded.encode(x), result.sae.encode(x))


@pytest.fixture(scope="module")
def spliceable(tiny_gpt2_dir: Path) -> HookedSAETransformer:
    """A model of its own: `from_bridge` changes the bridge's class in place."""
    return HookedSAETransformer.boot_transformers(str(tiny_gpt2_dir))


def test_it_splices_at_its_output_hook(
    trained: tuple[Any, RunResult],
    spliceable: HookedSAETransformer,
    tiny_gpt2_tokens: torch.Tensor,
    clean: dict[str, torch.Tensor],
) -> None:
    _, result = trained
    transcoder = SparseAutoencoder.load_from_disk(result.output_dir)
    tokens = tiny_gpt2_tokens
    with torch.no_grad():
        _, cache = spliceable.run_with_cache_with_saes(
            tokens, saes=[transcoder], names_filter=[HOOK_IN, HOOK_OUT]
        )
        predicted = transcoder(clean[HOOK_IN])
        torch.testing.assert_close(cache[HOOK_IN], clean[HOOK_IN], rtol=0, atol=0)  # the input is left alone
        torch.testing.assert_close(cache[HOOK_OUT], predicted, rtol=1e-5, atol=1e-5)
        spliced_logits = spliceable.run_with_saes(tokens, saes=[transcoder])
        assert (spliced_logits - spliceable(tokens)).abs().max() > 1e-4
        exact = spliceable.run_with_saes(tokens, saes=[transcoder], use_error_term=True)
        torch.testing.assert_close(exact, spliceable(tokens), rtol=1e-5, atol=1e-5)
    assert spliceable.acts_to_saes == {}  # the context took it out again


def test_run_evals_scores_it_against_its_output_hook(
    trained: tuple[Any, RunResult],
    tiny_gpt2: Any,
    tiny_gpt2_tokens: torch.Tensor,
    clean: dict[str, torch.Tensor],
) -> None:
    _, result = trained
    transcoder = SparseAutoencoder.load_from_disk(result.output_dir)
    metrics = run_evals(
        transcoder, tiny_gpt2, tiny_gpt2_tokens, EvalConfig(batch_size=8, show_progress=False)
    ).metrics
    valid = ~torch.isin(tiny_gpt2_tokens, eval_excluded_token_ids(tiny_gpt2.tokenizer))
    with torch.no_grad():
        predicted = transcoder(clean[HOOK_IN])
    by_hand = explained_variance(clean[HOOK_OUT][valid], predicted[valid])
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(by_hand, abs=1e-5)
    performance = metrics["model_performance_preservation"]
    assert performance["ce_loss_with_sae"] < performance["ce_loss_with_ablation"]


def test_input_normalisation_is_refused_for_transcoders(
    tiny_gpt2: Any, tiny_gpt2_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    cfg = make_runner_config(
        **transcoder_values(tiny_gpt2_dir, corpus, tmp_path, normalize_activations="expected_average_only_in")
    )
    with pytest.raises(SAELensError, match="normalize_activations is not supported for transcoders"):
        train_sae(cfg, model=tiny_gpt2, show_progress=False)
    assert not list(tmp_path.iterdir())
