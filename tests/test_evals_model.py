"""Downstream evals with an SAE spliced into real models: CE/KL on the tiny trained GPT-2, embedding
cosine on all-MiniLM-L6-v2. Exact "SAEs" (identity and zero) pin the scores to their ends."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sae_lens.evals import model_metrics, reconstruction_metrics, zero_ablate_hook
from sae_lens.saes import SAEConfig, StandardSAE

GPT2_HOOK = "blocks.0.hook_resid_post"
MINILM_HOOK = "blocks.2.hook_resid_post"


def identity_sae(d_in: int) -> StandardSAE:
    """relu(x) - relu(-x) = x: W_enc = [I, -I], W_dec = [I; -I], zero biases."""
    sae = StandardSAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture="standard"))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d_in: int) -> StandardSAE:
    """All weights zero: every latent is off and the output is b_dec = 0, i.e. zero-ablation."""
    sae = StandardSAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture="standard"))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.zero_()
    return sae


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of predicting token t+1 from position t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def identity_gpt2_metrics(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> dict[str, float]:
    return model_metrics(tiny_gpt2, identity_sae(64), tiny_gpt2_tokens, GPT2_HOOK)


@pytest.fixture(scope="module")
def minilm_tokens(minilm: Any) -> torch.Tensor:
    texts = [
        "Sparse autoencoders find interpretable directions in the residual stream of a model.",
        "The river flows past the old mill and under the stone bridge into the valley.",
        "Python's list comprehensions build lists from any iterable in a single expression.",
        "A good night's sleep helps the brain consolidate memories from the day before.",
    ]
    encoded = minilm.tokenizer(texts, padding="max_length", truncation=True, max_length=16)
    return torch.tensor(encoded["input_ids"])


def test_identity_sae_reconstructs_exactly(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> None:
    _, cache = tiny_gpt2.run_with_cache(tiny_gpt2_tokens, names_filter=[GPT2_HOOK])
    acts = cache[GPT2_HOOK].reshape(-1, 64)
    sae = identity_sae(64)
    torch.testing.assert_close(sae(acts), acts)
    metrics = reconstruction_metrics(sae, acts)
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mse"] == pytest.approx(0.0, abs=1e-10)


def test_gpt2_ce_values_match_a_direct_computation(
    tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor, identity_gpt2_metrics: dict[str, float]
) -> None:
    tokens = tiny_gpt2_tokens
    clean_ce = next_token_ce(tiny_gpt2(tokens), tokens)
    ablated_logits = tiny_gpt2.run_with_hooks(tokens, fwd_hooks=[(GPT2_HOOK, zero_ablate_hook)])
    ablated_ce = next_token_ce(ablated_logits, tokens)
    metrics = identity_gpt2_metrics
    # 16 rows of equal length in batches of 8: the mean of batch means is the overall mean.
    assert metrics["ce_loss_clean"] == pytest.approx(clean_ce, rel=1e-5)
    assert metrics["ce_loss_zero_ablated"] == pytest.approx(ablated_ce, rel=1e-5)
    # The model learned its corpus: clean CE is far below uniform, and ablation hurts.
    uniform = math.log(len(tiny_gpt2.tokenizer))
    assert metrics["ce_loss_clean"] < 0.5 * uniform
    assert metrics["ce_loss_clean"] + 0.5 < metrics["ce_loss_zero_ablated"]
    assert metrics["kl_div_zero_ablated"] > 0.1


def test_identity_sae_scores_one_on_gpt2(identity_gpt2_metrics: dict[str, float]) -> None:
    metrics = identity_gpt2_metrics
    assert metrics["ce_loss_with_sae"] == pytest.approx(metrics["ce_loss_clean"], abs=1e-5)
    assert metrics["ce_score"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["kl_score"] == pytest.approx(1.0, abs=1e-4)


def test_zero_sae_scores_zero_on_gpt2(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> None:
    metrics = model_metrics(tiny_gpt2, zero_sae(64), tiny_gpt2_tokens, GPT2_HOOK)
    assert metrics["ce_loss_with_sae"] == pytest.approx(metrics["ce_loss_zero_ablated"], abs=1e-5)
    assert metrics["ce_score"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["kl_div_with_sae"] == pytest.approx(metrics["kl_div_zero_ablated"], rel=1e-5)
    assert metrics["kl_score"] == pytest.approx(0.0, abs=1e-4)


def test_a_noisy_sae_scores_in_between(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> None:
    sae = identity_sae(64)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # reconstructs x / 2: worse than clean, better than zero
    metrics = model_metrics(tiny_gpt2, sae, tiny_gpt2_tokens, GPT2_HOOK)
    assert metrics["ce_loss_clean"] < metrics["ce_loss_with_sae"] < metrics["ce_loss_zero_ablated"]
    assert 0.0 < metrics["ce_score"] < 1.0
    assert 0.0 < metrics["kl_score"] < 1.0


def test_identity_sae_scores_one_on_minilm(minilm: Any, minilm_tokens: torch.Tensor) -> None:
    metrics = model_metrics(minilm, identity_sae(384), minilm_tokens, MINILM_HOOK)
    assert set(metrics) == {
        "embedding_cosine_with_sae",
        "embedding_cosine_zero_ablated",
        "embedding_cosine_score",
    }
    assert metrics["embedding_cosine_with_sae"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["embedding_cosine_score"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["embedding_cosine_zero_ablated"] < 0.99


def test_zero_sae_scores_zero_on_minilm(minilm: Any, minilm_tokens: torch.Tensor) -> None:
    metrics = model_metrics(minilm, zero_sae(384), minilm_tokens, MINILM_HOOK)
    assert metrics["embedding_cosine_with_sae"] == pytest.approx(
        metrics["embedding_cosine_zero_ablated"], abs=1e-5
    )
    assert metrics["embedding_cosine_score"] == pytest.approx(0.0, abs=1e-4)
