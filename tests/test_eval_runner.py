"""`run_evals` and `sae-lens eval`: every metric against a hand computation or a direct one on the
real tiny GPT-2 and all-MiniLM-L6-v2, special-token exclusion, transcoders, per-head hooks, held-out
rows, switched-off metric groups (with forward passes counted) and one-line errors."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from sae_lens import eval_runner
from sae_lens.cli import main as cli_main
from sae_lens.errors import SAELensError
from sae_lens.eval_runner import ActivationAccumulator, EvalConfig, eval_store, run_evals
from sae_lens.evals import (
    ce_loss_score,
    eval_excluded_token_ids,
    explained_variance,
    explained_variance_legacy_per_token,
    feature_weight_metrics,
    kl_div_score,
    kl_divergence,
    masked_mean_pool,
    model_metrics,
    next_token_log_probs,
    next_token_nll,
    prediction_mask,
)
from sae_lens.saes import SparseAutoencoder, registered_architectures
from tests.conftest import make_sae_config

GPT2_HOOK = "blocks.0.hook_resid_post"
QUIET = {"show_progress": False}
CAUSAL_GROUPS = {"model_behavior_preservation", "model_performance_preservation"}


# -- helpers ----------------------------------------------------------------------------------------


def random_sae(d_in: int, d_sae: int = 32, seed: int = 0, **metadata: Any) -> SparseAutoencoder:
    """A standard SAE with seeded random weights (non-trivial reconstructions) and `metadata`."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(make_sae_config("standard", d_in=d_in, d_sae=d_sae, metadata=metadata))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def identity_sae(d_in: int, **metadata: Any) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x: W_enc = [I, -I], W_dec = [I; -I], zero biases."""
    sae = SparseAutoencoder(make_sae_config("standard", d_in=d_in, d_sae=2 * d_in, metadata=metadata))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def with_separators(tokens: torch.Tensor, separator: int) -> torch.Tensor:
    """Rows with two document separators inside each (special tokens mid-row, as packing makes)."""
    tokens = tokens.clone()
    tokens[:, 9] = separator
    tokens[:, 20] = separator
    return tokens


@contextmanager
def counting_passes(model: Any) -> Iterator[dict[str, int]]:
    """Counts forward passes (the input embedding runs once per pass, even one stopped early) and
    passes that reached the last block."""
    counts = {"passes": 0, "last_block": 0}
    embedding = model.original_model.get_input_embeddings()
    last_block = model.blocks[-1]
    handles = [
        embedding.register_forward_hook(lambda *_: counts.__setitem__("passes", counts["passes"] + 1)),
        last_block.register_forward_hook(
            lambda *_: counts.__setitem__("last_block", counts["last_block"] + 1)
        ),
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shapes and values to float32 precision (torch.testing's first call costs seconds)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.float(), expected.float(), rtol=1.3e-6, atol=1e-5), (actual, expected)


def strict_json(text: str) -> Any:
    """json.loads that rejects NaN/Infinity (not JSON, though Python writes them)."""

    def reject(constant: str) -> None:
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


# -- the metric functions, by hand ------------------------------------------------------------------


def test_accumulator_matches_a_hand_computation() -> None:
    # Two eval batches. All four tokens: mean (1.5, 1), Σ‖x - x̄‖² = 1.25 + 3.25 + 3.25 + 1.25 = 9;
    # squared errors 0, 2 | 1, 0 -> 3.
    x_a, x_hat_a = torch.tensor([[1.0, 0], [3, 0]]), torch.tensor([[1.0, 0], [2, 1]])
    x_b, x_hat_b = torch.tensor([[0.0, 2], [2, 2]]), torch.tensor([[0.0, 1], [2, 2]])
    f_a = torch.tensor([[1.0, 0, 0], [0, 2, 0]])
    f_b = torch.tensor([[0.0, 0, 0], [3, 0, -1]])
    acc = ActivationAccumulator(d_out=2, d_sae=3, per_feature=True, device=torch.device("cpu"))
    for x, x_hat, f in ((x_a, x_hat_a, f_a), (x_b, x_hat_b, f_b)):
        batch_mean = acc.add_batch(x)
        acc.add_chunk(x[:1], x_hat[:1], f[:1], batch_mean)  # two chunks per batch, as for a big SAE
        acc.add_chunk(x[1:], x_hat[1:], f[1:], batch_mean)
    quality, shrinkage, sparsity = acc.reconstruction_quality(), acc.shrinkage(), acc.sparsity()
    assert quality["explained_variance"] == pytest.approx(1 - 3 / 9)
    # Legacy: batch means (2, 0) and (1, 2), every spread 1 -> per-token 1, -1, 0, 1.
    assert quality["explained_variance_legacy"] == pytest.approx(0.25)
    assert quality["mse"] == pytest.approx(3 / 8)
    assert quality["cossim"] == pytest.approx((3 + 2 / math.sqrt(5)) / 4)
    assert shrinkage["l2_norm_in"] == pytest.approx((1 + 3 + 2 + 2 * math.sqrt(2)) / 4)
    assert shrinkage["l2_norm_out"] == pytest.approx((1 + math.sqrt(5) + 1 + 2 * math.sqrt(2)) / 4)
    assert shrinkage["l2_ratio"] == pytest.approx((1 + math.sqrt(5) / 3 + 1 / 2 + 1) / 4)
    assert shrinkage["relative_reconstruction_bias"] == pytest.approx((1 + 5 + 1 + 8) / (1 + 6 + 2 + 8))
    assert sparsity == pytest.approx({"l0": 4 / 4, "l1": 7 / 4})  # counted as != 0, and |f|
    features = acc.feature_metrics()
    assert_close(features["density"], torch.tensor([0.5, 0.25, 0.25]))
    assert_close(features["mean_activation"], torch.tensor([1.0, 0.5, -0.25]))
    assert_close(features["mean_activation_when_active"], torch.tensor([2.0, 2.0, -1.0]))
    assert_close(features["max_activation"], torch.tensor([3.0, 2.0, 0.0]))
    assert features["density"].sum().item() == pytest.approx(sparsity["l0"])  # Σ density = L0


def test_centred_explained_variance_streams_over_batches_like_the_whole_set() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator) * 3 + 50  # a large mean, as residual streams have
    x_hat = x + torch.randn(300, 6, generator=generator)
    acc = ActivationAccumulator(d_out=6, d_sae=1, per_feature=False, device=torch.device("cpu"))
    for start in range(0, 300, 70):
        acc.add_chunk(
            x[start : start + 70],
            x_hat[start : start + 70],
            torch.zeros(70, 1),
            acc.add_batch(x[start : start + 70]),
        )
    assert acc.reconstruction_quality()["explained_variance"] == pytest.approx(
        explained_variance(x, x_hat), abs=1e-12
    )


def test_legacy_explained_variance_is_per_token_about_the_batch_mean() -> None:
    x, x_hat = torch.tensor([[0.0, 0], [2, 0], [4, 0]]), torch.tensor([[1.0, 0], [2, 1], [4, 0]])
    # batch mean (2, 0): spreads 4, 0, 4; errors 1, 1, 0 -> 0.75, undefined, 1.
    values = explained_variance_legacy_per_token(x, x_hat)
    assert values[0].item() == pytest.approx(0.75)
    assert math.isnan(values[1].item())
    assert values[2].item() == pytest.approx(1.0)
    centred_elsewhere = explained_variance_legacy_per_token(x, x_hat, batch_mean=torch.tensor([0.0, 0]))
    assert math.isnan(centred_elsewhere[0].item()) and centred_elsewhere[1].item() == pytest.approx(0.75)


def test_next_token_ce_and_kl_by_hand() -> None:
    tokens = torch.tensor([[5, 0, 1, 0]])
    valid = torch.tensor([[True, False, True, True]])
    mask = prediction_mask(valid)
    assert mask.tolist() == [[False, False, True]]  # both the position and its target must be valid
    clean_logits = torch.zeros(1, 4, 2)  # p = (1/2, 1/2) everywhere
    other_logits = torch.zeros(1, 4, 2)
    other_logits[..., 0] = math.log(3)  # p = (3/4, 1/4)
    clean, other = next_token_log_probs(clean_logits, mask), next_token_log_probs(other_logits, mask)
    assert next_token_nll(clean, tokens, mask).tolist() == pytest.approx([math.log(2)])
    assert next_token_nll(other, tokens, mask).tolist() == pytest.approx([-math.log(3 / 4)])
    # KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    assert kl_divergence(clean, other).tolist() == pytest.approx([0.5 * math.log(4 / 3)])
    assert ce_loss_score(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert kl_div_score(0.1, 0.4) == pytest.approx(0.75)
    assert math.isnan(ce_loss_score(2.0, 2.0, 2.0)) and math.isnan(kl_div_score(0.1, 0.0))


def test_masked_mean_pool_and_weight_metrics_by_hand() -> None:
    resid = torch.tensor([[[1.0, 0], [3, 2], [100, 100]]])
    pooled = masked_mean_pool(resid, torch.tensor([[True, True, False]]))
    assert_close(pooled, torch.tensor([[2.0, 1.0]]))
    sae = SparseAutoencoder(make_sae_config("standard", d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[3.0, 0], [4, 1]]))  # columns (3, 4) and (0, 1)
        sae.W_dec.copy_(torch.tensor([[0.6, 0.8], [2, 0]]))
    metrics = feature_weight_metrics(sae)
    assert_close(metrics["encoder_norm"], torch.tensor([5.0, 1.0]))
    assert_close(metrics["decoder_norm"], torch.tensor([1.0, 2.0]))
    assert_close(metrics["encoder_decoder_cosine"], torch.tensor([1.0, 0.0]))


def test_excluded_ids_are_the_special_tokens(minilm: Any, tiny_gpt2: Any) -> None:
    # MiniLM: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103; padding stays out regardless.
    assert eval_excluded_token_ids(minilm.tokenizer).tolist() == [0, 100, 101, 102, 103]
    assert eval_excluded_token_ids(minilm.tokenizer, exclude_special_tokens=False).tolist() == [0]
    bos = tiny_gpt2.tokenizer.bos_token_id
    assert bos in eval_excluded_token_ids(tiny_gpt2.tokenizer).tolist()
    assert eval_excluded_token_ids(tiny_gpt2.tokenizer, exclude_special_tokens=False).tolist() == []


# -- run_evals on the tiny GPT-2 against direct computations ----------------------------------------


@pytest.fixture(scope="module")
def gpt2_rows(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> torch.Tensor:
    return with_separators(tiny_gpt2_tokens, tiny_gpt2.tokenizer.eos_token_id)


def test_run_evals_matches_a_direct_computation(tiny_gpt2: Any, gpt2_rows: torch.Tensor) -> None:
    sae = random_sae(64, hook_name=GPT2_HOOK)
    result = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=4, **QUIET))

    valid = ~torch.isin(gpt2_rows, eval_excluded_token_ids(tiny_gpt2.tokenizer))
    assert valid.sum() == 16 * (32 - 3)  # BOS and two separators per row
    with torch.no_grad():
        clean_logits, cache = tiny_gpt2.run_with_cache(gpt2_rows, names_filter=[GPT2_HOOK])
        acts = cache[GPT2_HOOK]
        x, x_hat = acts[valid], sae(acts[valid])

        def splice_valid(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return torch.where(valid[..., None], sae(activation), activation)

        def ablate_valid(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return torch.where(valid[..., None], torch.zeros_like(activation), activation)

        sae_logits = tiny_gpt2.run_with_hooks(gpt2_rows, fwd_hooks=[(GPT2_HOOK, splice_valid)])
        ablated_logits = tiny_gpt2.run_with_hooks(gpt2_rows, fwd_hooks=[(GPT2_HOOK, ablate_valid)])
    counted = valid[:, :-1] & valid[:, 1:]
    targets = gpt2_rows[:, 1:][counted]

    def ce(logits: torch.Tensor) -> float:
        return F.cross_entropy(logits[:, :-1][counted].float(), targets).item()

    def kl(logits: torch.Tensor) -> float:
        clean = clean_logits[:, :-1][counted].log_softmax(-1)
        other = logits[:, :-1][counted].log_softmax(-1)
        return F.kl_div(other, clean, log_target=True, reduction="sum").item() / counted.sum().item()

    m = result.metrics
    quality = m["reconstruction_quality"]
    assert quality["explained_variance"] == pytest.approx(explained_variance(x, x_hat), abs=1e-6)
    per_batch_legacy = [
        explained_variance_legacy_per_token(
            acts[i : i + 4][valid[i : i + 4]], sae(acts[i : i + 4][valid[i : i + 4]])
        )
        for i in range(0, 16, 4)
    ]
    assert quality["explained_variance_legacy"] == pytest.approx(
        torch.cat(per_batch_legacy).mean().item(), abs=1e-6
    )
    assert quality["mse"] == pytest.approx(F.mse_loss(x_hat, x).item(), rel=1e-5)
    assert quality["cossim"] == pytest.approx(F.cosine_similarity(x, x_hat).mean().item(), abs=1e-6)
    shrinkage = m["shrinkage"]
    assert shrinkage["l2_ratio"] == pytest.approx(
        (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(), rel=1e-5
    )
    bias = x_hat.pow(2).sum() / (x * x_hat).sum()
    assert shrinkage["relative_reconstruction_bias"] == pytest.approx(bias.item(), rel=1e-5)
    latents = sae.encode(x)
    assert m["sparsity"]["l0"] == pytest.approx((latents != 0).sum(-1).float().mean().item())
    assert m["sparsity"]["l1"] == pytest.approx(latents.abs().sum(-1).mean().item(), rel=1e-5)
    performance = m["model_performance_preservation"]
    assert performance["ce_loss_without_sae"] == pytest.approx(ce(clean_logits), rel=1e-5)
    assert performance["ce_loss_with_sae"] == pytest.approx(ce(sae_logits), rel=1e-5)
    assert performance["ce_loss_with_ablation"] == pytest.approx(ce(ablated_logits), rel=1e-5)
    behaviour = m["model_behavior_preservation"]
    assert behaviour["kl_div_with_sae"] == pytest.approx(kl(sae_logits), rel=1e-4, abs=1e-7)
    assert behaviour["kl_div_with_ablation"] == pytest.approx(kl(ablated_logits), rel=1e-4, abs=1e-7)
    assert m["token_stats"] == {
        "total_rows": 16,
        "total_tokens_read": 16 * 32,
        "total_tokens_excluded": 16 * 3,
        "total_tokens_eval_sparsity_variance": 16 * 29,
        "total_tokens_eval_reconstruction": int(counted.sum()),
    }
    features = result.feature_metrics
    assert features is not None
    assert_close(features["density"], (latents != 0).float().mean(0))
    assert_close(features["max_activation"], latents.max(0).values)
    assert features["encoder_norm"].shape == (32,)


def test_with_special_tokens_included_ce_kl_equal_the_trainers_model_metrics(
    tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor
) -> None:
    sae = random_sae(64, hook_name=GPT2_HOOK)
    cfg = EvalConfig(batch_size=16, exclude_special_tokens=False, **QUIET)
    m = run_evals(sae, tiny_gpt2, tiny_gpt2_tokens, cfg).metrics
    reference = model_metrics(tiny_gpt2, sae, tiny_gpt2_tokens, GPT2_HOOK, batch_size=16)
    performance, behaviour = m["model_performance_preservation"], m["model_behavior_preservation"]
    assert performance["ce_loss_without_sae"] == pytest.approx(reference["ce_loss_clean"], rel=1e-5)
    assert performance["ce_loss_with_sae"] == pytest.approx(reference["ce_loss_with_sae"], rel=1e-5)
    assert performance["ce_loss_with_ablation"] == pytest.approx(reference["ce_loss_zero_ablated"], rel=1e-5)
    assert performance["ce_loss_score"] == pytest.approx(reference["ce_score"], rel=1e-4)
    assert behaviour["kl_div_with_sae"] == pytest.approx(reference["kl_div_with_sae"], rel=1e-4)
    assert m["token_stats"]["total_tokens_excluded"] == 0


@pytest.mark.parametrize("kind", ["identity", "zero"])
def test_exact_saes_pin_the_scores(tiny_gpt2: Any, gpt2_rows: torch.Tensor, kind: str) -> None:
    sae = identity_sae(64, hook_name=GPT2_HOOK)
    if kind == "zero":
        with torch.no_grad():
            for parameter in sae.parameters():
                parameter.zero_()
    m = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=8, **QUIET)).metrics
    performance, behaviour = m["model_performance_preservation"], m["model_behavior_preservation"]
    if kind == "identity":
        assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
        assert performance["ce_loss_with_sae"] == pytest.approx(performance["ce_loss_without_sae"], abs=1e-5)
        assert behaviour["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
        assert performance["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    else:
        # Zero output at the valid positions is exactly the ablation.
        assert performance["ce_loss_with_sae"] == pytest.approx(
            performance["ce_loss_with_ablation"], abs=1e-6
        )
        assert behaviour["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
        assert m["reconstruction_quality"]["explained_variance"] < 0.01


def test_chunking_and_batching_leave_the_centred_metrics_unchanged(
    tiny_gpt2: Any, gpt2_rows: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    sae = random_sae(64, hook_name=GPT2_HOOK)
    cfg = {"compute_ce_kl": False, **QUIET}
    whole = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=16, **cfg))
    monkeypatch.setattr(eval_runner, "SAE_CHUNK_ELEMENTS", 32 * 7)  # 7 tokens per SAE chunk
    streamed = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=3, **cfg))
    for group in ("shrinkage", "sparsity"):
        assert streamed.metrics[group] == pytest.approx(whole.metrics[group], rel=1e-6)
    quality, whole_quality = (
        streamed.metrics["reconstruction_quality"],
        whole.metrics["reconstruction_quality"],
    )
    assert quality["explained_variance"] == pytest.approx(whole_quality["explained_variance"], abs=1e-9)
    # The legacy figure is centred on each batch's own mean, so it depends on the batch size.
    assert quality["explained_variance_legacy"] != pytest.approx(
        whole_quality["explained_variance_legacy"], abs=1e-9
    )
    assert streamed.feature_metrics is not None and whole.feature_metrics is not None
    assert_close(streamed.feature_metrics["density"], whole.feature_metrics["density"])


def test_switched_off_groups_are_absent_and_their_passes_never_run(
    tiny_gpt2: Any, gpt2_rows: torch.Tensor
) -> None:
    sae = random_sae(64, hook_name=GPT2_HOOK)
    with counting_passes(tiny_gpt2) as full:
        everything = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=4, **QUIET))
    # A 4-token probe (shapes), then per batch one clean pass and two spliced ones, all to the logits.
    assert full == {"passes": 1 + 3 * 4, "last_block": 3 * 4}
    assert set(everything.metrics) >= CAUSAL_GROUPS
    off = EvalConfig(
        batch_size=4, compute_ce_kl=False, compute_feature_metrics=False, compute_shrinkage=False, **QUIET
    )
    with counting_passes(tiny_gpt2) as reduced:
        result = run_evals(sae, tiny_gpt2, gpt2_rows, off)
    # One pass per batch, stopped once block 0's output is captured: block 1 never runs.
    assert reduced == {"passes": 1 + 4, "last_block": 0}
    assert set(result.metrics) == {"reconstruction_quality", "sparsity", "token_stats"}
    assert result.feature_metrics is None and "feature_metrics" not in result.to_dict()
    assert result.metrics["reconstruction_quality"] == everything.metrics["reconstruction_quality"]


@pytest.mark.parametrize("architecture", registered_architectures())
def test_every_architecture_is_scored_on_its_inference_output(
    tiny_gpt2: Any, gpt2_rows: torch.Tensor, architecture: str
) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        make_sae_config(architecture, d_in=64, d_sae=128, metadata={"hook_name": GPT2_HOOK})
    )
    sae.train()
    m = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(compute_ce_kl=False, **QUIET)).metrics
    assert sae.training  # the mode is restored
    valid = ~torch.isin(gpt2_rows, eval_excluded_token_ids(tiny_gpt2.tokenizer))
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(gpt2_rows, names_filter=[GPT2_HOOK])
        x = cache[GPT2_HOOK][valid]
        sae.eval()
        expected = explained_variance(x, sae(x))
        l0 = (sae.encode(x) != 0).sum(-1).float().mean().item()
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(expected, abs=1e-6)
    assert m["sparsity"]["l0"] == pytest.approx(l0)


# -- transcoders and per-head hooks -----------------------------------------------------------------

TRANSCODER_IN, TRANSCODER_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def transcoder(seed: int = 0, d_out: int = 64) -> SparseAutoencoder:
    """A small skip transcoder from block 0's MLP input (after ln2) to its output."""
    torch.manual_seed(seed)
    cfg = make_sae_config(
        "standard",
        d_in=64,
        d_sae=48,
        d_out=d_out,
        apply_b_dec_to_input=False,
        skip_connection=True,
        metadata={"hook_name": TRANSCODER_IN, "hook_name_out": TRANSCODER_OUT},
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_skip.normal_(0, 0.05)
    return sae


def test_transcoder_is_scored_against_its_output_hook(tiny_gpt2: Any, gpt2_rows: torch.Tensor) -> None:
    assert {TRANSCODER_IN, TRANSCODER_OUT} <= set(tiny_gpt2.hook_dict)
    tc = transcoder()
    assert tc.cfg.is_transcoder
    m = run_evals(tc, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=8, **QUIET)).metrics
    valid = ~torch.isin(gpt2_rows, eval_excluded_token_ids(tiny_gpt2.tokenizer))
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(gpt2_rows, names_filter=[TRANSCODER_IN, TRANSCODER_OUT])
        predicted = tc(cache[TRANSCODER_IN])  # the skip path included
        target = cache[TRANSCODER_OUT]

        def replace_output(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return torch.where(valid[..., None], predicted, activation)

        logits = tiny_gpt2.run_with_hooks(gpt2_rows, fwd_hooks=[(TRANSCODER_OUT, replace_output)])
    counted = valid[:, :-1] & valid[:, 1:]
    expected_ce = F.cross_entropy(logits[:, :-1][counted], gpt2_rows[:, 1:][counted]).item()
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(
        explained_variance(target[valid], predicted[valid]), abs=1e-6
    )
    assert m["model_performance_preservation"]["ce_loss_with_sae"] == pytest.approx(expected_ce, rel=1e-5)
    assert m["shrinkage"]["l2_norm_in"] == pytest.approx(target[valid].norm(dim=-1).mean().item(), rel=1e-5)


def test_zero_transcoder_equals_ablating_its_output_hook(tiny_gpt2: Any, gpt2_rows: torch.Tensor) -> None:
    tc = transcoder()
    with torch.no_grad():
        for parameter in tc.parameters():
            parameter.zero_()
    performance = run_evals(tc, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=16, **QUIET)).metrics[
        "model_performance_preservation"
    ]
    assert performance["ce_loss_with_sae"] == pytest.approx(performance["ce_loss_with_ablation"], abs=1e-6)
    assert performance["ce_loss_with_sae"] != pytest.approx(performance["ce_loss_without_sae"], abs=1e-4)


def test_wrong_transcoder_width_is_refused_before_any_batch(tiny_gpt2: Any, gpt2_rows: torch.Tensor) -> None:
    with (
        counting_passes(tiny_gpt2) as counts,
        pytest.raises(SAELensError, match=r"d_out=32 .*hook_mlp_out has width 64"),
    ):
        run_evals(transcoder(d_out=32), tiny_gpt2, gpt2_rows, EvalConfig(**QUIET))
    assert counts["passes"] == 1  # the probe only


@pytest.mark.parametrize("head_index", [1, None])
def test_attn_hook_z_single_head_and_concatenated(
    tiny_gpt2: Any, gpt2_rows: torch.Tensor, head_index: int | None
) -> None:
    hook = "blocks.0.attn.hook_z"  # [batch, pos, 4 heads, 16]
    d_in = 16 if head_index is not None else 64
    sae = random_sae(d_in, hook_name=hook, hook_head_index=head_index)
    m = run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=16, **QUIET)).metrics
    valid = ~torch.isin(gpt2_rows, eval_excluded_token_ids(tiny_gpt2.tokenizer))
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(gpt2_rows, names_filter=[hook])
        z = cache[hook]
        read = z[:, :, head_index] if head_index is not None else z.flatten(-2)
        assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(
            explained_variance(read[valid], sae(read[valid])), abs=1e-6
        )
        identity = identity_sae(d_in, hook_name=hook, hook_head_index=head_index)
    exact = run_evals(identity, tiny_gpt2, gpt2_rows, EvalConfig(batch_size=16, **QUIET)).metrics
    performance = exact["model_performance_preservation"]
    assert performance["ce_loss_with_sae"] == pytest.approx(performance["ce_loss_without_sae"], abs=1e-5)
    if head_index is not None:
        # Ablation zeroes only the SAE's head: milder than zeroing all four.
        def zero_all(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return torch.where(valid[..., None, None], torch.zeros_like(activation), activation)

        with torch.no_grad():
            logits = tiny_gpt2.run_with_hooks(gpt2_rows, fwd_hooks=[(hook, zero_all)])
        counted = valid[:, :-1] & valid[:, 1:]
        all_heads_ce = F.cross_entropy(logits[:, :-1][counted], gpt2_rows[:, 1:][counted]).item()
        assert performance["ce_loss_with_ablation"] < all_heads_ce


def test_a_head_index_beyond_the_heads_is_refused(tiny_gpt2: Any, gpt2_rows: torch.Tensor) -> None:
    sae = random_sae(16, hook_name="blocks.0.attn.hook_z", hook_head_index=4)
    with pytest.raises(SAELensError, match="has 4 heads"):
        run_evals(sae, tiny_gpt2, gpt2_rows, EvalConfig(**QUIET))


# -- the encoder model ------------------------------------------------------------------------------


MINILM_HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def minilm_store(minilm: Any, tiny_corpus_text: str) -> Any:
    sae = random_sae(384, hook_name=MINILM_HOOK, context_size=24, prepend_bos=True)
    documents = [{"text": paragraph} for paragraph in tiny_corpus_text.split("\n\n")]
    return eval_store(minilm, sae, documents, n_held_out_rows=4, batch_size=2)


def test_minilm_embedding_cosine_matches_a_direct_computation(minilm: Any, minilm_store: Any) -> None:
    sae = SparseAutoencoder(
        make_sae_config("topk", d_in=384, d_sae=768, k=16, metadata={"hook_name": MINILM_HOOK})
    )
    result = run_evals(sae, minilm, minilm_store, EvalConfig(batch_size=2, **QUIET))
    m = result.metrics
    assert not CAUSAL_GROUPS & set(m) and "embedding_preservation" in m
    rows = minilm_store.eval_tokens
    assert m["token_stats"]["total_rows"] == 4 and rows.shape == (4, 24)
    valid = ~torch.isin(rows, eval_excluded_token_ids(minilm.tokenizer))
    final = "blocks.5.hook_resid_post"
    with torch.no_grad():

        def splice_valid(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return torch.where(valid[..., None], sae(activation), activation)

        _, clean = minilm.run_with_cache(rows, names_filter=[final])
        with minilm.hooks(fwd_hooks=[(MINILM_HOOK, splice_valid)]):
            _, spliced = minilm.run_with_cache(rows, names_filter=[final])
    cosine = F.cosine_similarity(
        masked_mean_pool(spliced[final], valid), masked_mean_pool(clean[final], valid)
    )
    preservation = m["embedding_preservation"]
    assert preservation["embedding_cosine_with_sae"] == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert m["sparsity"]["l0"] == pytest.approx(16.0)
    assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == int(valid.sum())
    assert m["token_stats"]["total_tokens_excluded"] == 4  # one [CLS] per row


def test_store_rows_are_the_held_out_rows_then_the_following_ones(
    minilm: Any, minilm_store: Any, tiny_corpus_text: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sae_lens.activations_store import ActivationsStore
    from tests.conftest import make_runner_config

    documents = [{"text": paragraph} for paragraph in tiny_corpus_text.split("\n\n")]
    training = ActivationsStore.from_config(
        minilm,
        make_runner_config(hook_point=MINILM_HOOK, context_size=24, n_eval_sequences=4),
        dataset=documents,
    )
    assert training.eval_tokens is not None
    assert_close(minilm_store.eval_tokens, training.eval_tokens)  # the trainer's held-out rows
    sae = random_sae(384, hook_name=MINILM_HOOK, context_size=24)
    cfg = EvalConfig(
        batch_size=2, compute_ce_kl=False, compute_feature_metrics=False, n_eval_tokens=6 * 24, **QUIET
    )
    fresh = eval_store(minilm, sae, documents, n_held_out_rows=4, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="sae_lens"):
        beyond = run_evals(sae, minilm, fresh, cfg)
    assert beyond.metrics["token_stats"]["total_rows"] == 6
    assert "beyond the store's 4 held-out rows" in caplog.text
    training_rows = torch.cat([training.eval_tokens, training.get_batch_tokens(2)])
    direct = run_evals(sae, minilm, training_rows, cfg)
    assert direct.metrics == beyond.metrics


# -- the command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_sae_folder(
    tiny_gpt2_dir: Path, tiny_corpus_text: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A saved SAE whose metadata names the tiny GPT-2, its hook and a text dataset, and the run's
    training_config.yaml (3 held-out rows)."""
    folder = tmp_path_factory.mktemp("eval_cli")
    (folder / "corpus.txt").write_text(tiny_corpus_text)
    sae = random_sae(
        64,
        hook_name=GPT2_HOOK,
        model_name=str(tiny_gpt2_dir),
        dataset_path=str(folder / "corpus.txt"),
        context_size=32,
        prepend_bos=True,
    )
    sae.save_model(folder / "sae")
    (folder / "sae" / "training_config.yaml").write_text(yaml.safe_dump({"n_eval_sequences": 3}))
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(["eval", *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_every_group_as_strict_json(
    gpt2_sae_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = gpt2_sae_folder / "eval.json"
    code, out, err = run_cli([str(gpt2_sae_folder / "sae"), "--output", str(output)], capsys)
    assert code == 0, err
    report = strict_json(output.read_text())
    assert {*CAUSAL_GROUPS, "reconstruction_quality", "shrinkage", "sparsity", "token_stats"} == set(
        report["metrics"]
    )
    assert report["metrics"]["token_stats"]["total_rows"] == 3  # the held-out rows of training_config.yaml
    per_feature = report["feature_metrics"]["per_feature"]
    assert {"density", "max_activation", "encoder_norm", "decoder_norm", "encoder_decoder_cosine"} <= set(
        per_feature
    )
    assert len(per_feature["density"]) == 32
    assert report["sae"]["hook_name"] == GPT2_HOOK and report["context_size"] == 32
    assert "explained_variance" in out and str(output) in out


def test_cli_flags_switch_groups_and_passes_off(
    gpt2_sae_folder: Path, tiny_gpt2: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI's own model load would be a second copy; hand it the session's model to count its passes.
    monkeypatch.setattr("sae_lens.cli.eval.load_model", lambda *args, **kwargs: tiny_gpt2)
    args = [
        str(gpt2_sae_folder / "sae"),
        "--no-ce-kl",
        "--no-feature-metrics",
        "--n-batches",
        "2",
        "--batch-size",
        "2",
    ]
    with counting_passes(tiny_gpt2) as counts:
        code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = strict_json(out)
    assert not CAUSAL_GROUPS & set(report["metrics"]) and "feature_metrics" not in report
    assert report["metrics"]["token_stats"]["total_rows"] == 4
    assert counts == {"passes": 1 + 2, "last_block": 0}


@pytest.mark.parametrize(
    "case",
    [
        "missing_sae",
        "missing_hook",
        "wrong_width",
        "empty_dataset",
        "output_folder_missing",
        "output_is_folder",
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    case: str, gpt2_sae_folder: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = str(gpt2_sae_folder / "sae")
    (gpt2_sae_folder / "empty.txt").write_text("")
    cases = {
        "missing_sae": ([str(gpt2_sae_folder / "nope")], "does not exist"),
        "missing_hook": ([sae, "--hook", "blocks.7.hook_resid_post"], "not found"),
        "wrong_width": (
            [sae, "--model", "sentence-transformers/all-MiniLM-L6-v2", "--n-batches", "1"],
            "d_in=64",
        ),
        "empty_dataset": ([sae, "--dataset", str(gpt2_sae_folder / "empty.txt")], "dataset"),
        # Checked first: the missing SAE is never reached.
        "output_folder_missing": (
            [str(gpt2_sae_folder / "nope"), "--output", "/nonexistent/x/out.json"],
            "does not exist; create it",
        ),
        "output_is_folder": ([sae, "--output", str(gpt2_sae_folder)], "is a folder"),
    }
    args, fragment = cases[case]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sae-lens: error:"), err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_cli_rejects_a_non_positive_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", "some_sae", "--n-tokens", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
