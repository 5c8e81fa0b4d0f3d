"""Evals (sae_lens/evals.py): explained variance and reconstruction metrics by hand, and downstream
evals with an SAE spliced into real models: CE/KL on the tiny trained GPT-2, embedding cosine on
all-MiniLM-L6-v2, and splicing on per-head `attn.hook_z`. Exact "SAEs" (identity and zero) pin the
scores to their ends."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sae_lens.evals import (
    explained_variance,
    model_metrics,
    reconstruction_metrics,
    splice_hook,
    zero_ablate_hook,
)
from sae_lens.saes import SparseAutoencoder, StandardSAE
from tests.conftest import make_sae_config

# -- explained variance -------------------------------------------------------------------------------


def test_explained_variance_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
    # mean x = [3, 2]; Σ‖x - x̄‖² = (4 + 0) + (0 + 4) + (4 + 4) = 16
    # Σ‖x - x̂‖² = 1 + 1 + 1 = 3  ->  1 - 3/16
    assert explained_variance(x, x_hat) == pytest.approx(1 - 3 / 16, rel=1e-12)
    # The uncentred form 1 - Σ‖x - x̂‖² / Σ‖x‖² = 1 - 3/55 is a different number.
    assert explained_variance(x, x_hat) != pytest.approx(1 - 3 / 55, rel=1e-3)


def test_explained_variance_edge_cases() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) + 10.0
    assert explained_variance(x, x) == 1.0
    # Predicting the mean explains nothing; a large offset in x does not change that.
    assert explained_variance(x, x.mean(dim=0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, torch.zeros_like(x)) < -10


# -- reconstruction metrics ---------------------------------------------------------------------------


def hand_sae() -> SparseAutoencoder:
    """d_in=2, d_sae=3: latents 0 and 1 read relu(x_0), relu(x_1); latent 2 can never fire."""
    sae = SparseAutoencoder(make_sae_config("standard", 2, 3, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.zero_()
    return sae


def test_reconstruction_metrics_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, -2.0], [4.0, 1.0]])
    # latents: [1, 2, 0], [0, 3, 0], [2, 0, 0], [4, 1, 0]
    # x_hat = [2 f_0, f_1]: [2, 2], [0, 3], [4, 0], [8, 1]
    x_hat = torch.tensor([[2.0, 2.0], [0.0, 3.0], [4.0, 0.0], [8.0, 1.0]])
    metrics = reconstruction_metrics(hand_sae(), x, batch_size=3)  # 3: chunks of 3 and 1

    assert metrics["l0"] == pytest.approx((2 + 1 + 1 + 2) / 4)
    assert metrics["l1"] == pytest.approx((3 + 3 + 2 + 5) / 4)
    # squared errors 1, 1, 8, 16 over 4 tokens x 2 dims
    assert metrics["mse"] == pytest.approx(26 / 8)
    total = ((x - x.mean(dim=0)) ** 2).sum().item()
    assert metrics["explained_variance"] == pytest.approx(1 - 26 / total)

    cosines = [
        (2 + 4) / (math.sqrt(5) * math.sqrt(8)),
        9 / (math.sqrt(10) * 3),
        8 / (math.sqrt(8) * 4),
        33 / (math.sqrt(17) * math.sqrt(65)),
    ]
    assert metrics["cosine_similarity"] == pytest.approx(sum(cosines) / 4, rel=1e-6)
    ratios = [math.sqrt(8 / 5), 3 / math.sqrt(10), 4 / math.sqrt(8), math.sqrt(65 / 17)]
    assert metrics["l2_ratio"] == pytest.approx(sum(ratios) / 4, rel=1e-6)
    # E‖x̂‖² / E[x·x̂] = mean(8, 9, 16, 65) / mean(6, 9, 8, 33)
    assert metrics["relative_reconstruction_bias"] == pytest.approx(
        (8 + 9 + 16 + 65) / (6 + 9 + 8 + 33), rel=1e-6
    )
    # densities: latent 0 fires on tokens 0, 2, 3; latent 1 on 0, 1, 3; latent 2 never.
    torch.testing.assert_close(metrics["feature_density"], torch.tensor([0.75, 0.75, 0.0]))
    assert metrics["dead_fraction"] == pytest.approx(1 / 3)
    assert metrics["dense_fraction"] == pytest.approx(2 / 3)

    # Independent of the batching.
    whole = reconstruction_metrics(hand_sae(), x, batch_size=4096)
    for key in ("l0", "l1", "mse", "explained_variance", "cosine_similarity", "l2_ratio"):
        assert whole[key] == pytest.approx(metrics[key], rel=1e-6)
    torch.testing.assert_close(whole["feature_density"], metrics["feature_density"])
    # x_hat itself, as a sanity check of the hand values above.
    torch.testing.assert_close(hand_sae()(x.double()).float(), x_hat)


def test_dense_fraction_threshold() -> None:
    # 20 tokens: latent 0 fires on 2 (density 0.1, not dense), latent 1 on 3 (0.15, dense).
    sae = hand_sae()
    x = torch.full((20, 2), -1.0)
    x[:2, 0] = 1.0
    x[:3, 1] = 1.0
    metrics = reconstruction_metrics(sae, x)
    torch.testing.assert_close(metrics["feature_density"], torch.tensor([0.1, 0.15, 0.0]))
    assert metrics["dense_fraction"] == pytest.approx(1 / 3)
    assert metrics["dead_fraction"] == pytest.approx(1 / 3)


# -- downstream evals on real models ----------------------------------------------------------------

GPT2_HOOK = "blocks.0.hook_resid_post"
MINILM_HOOK = "blocks.2.hook_resid_post"


def identity_sae(d_in: int, **kw: Any) -> StandardSAE:
    """relu(x) - relu(-x) = x: W_enc = [I, -I], W_dec = [I; -I], zero biases."""
    sae = StandardSAE(make_sae_config("standard", d_in, 2 * d_in, **kw))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d_in: int, **kw: Any) -> StandardSAE:
    """All weights zero: every latent is off and the output is b_dec = 0, i.e. zero-ablation."""
    sae = StandardSAE(make_sae_config("standard", d_in, 2 * d_in, **kw))
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


# -- splicing on per-head hooks (attn.hook_z) -----------------------------------------------------------

Z_HOOK = "blocks.0.attn.hook_z"
N_HEADS, D_HEAD = 4, 16


@pytest.fixture(scope="module")
def hook_z(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> torch.Tensor:
    """The tiny GPT-2's `blocks.0.attn.hook_z` on the held-out rows, `[16, 32, 4, 16]`."""
    _, cache = tiny_gpt2.run_with_cache(tiny_gpt2_tokens, names_filter=[Z_HOOK])
    z = cache[Z_HOOK]
    assert z.shape == (16, 32, N_HEADS, D_HEAD)
    return z


def random_sae(d_in: int, seed: int = 0, **kw: Any) -> SparseAutoencoder:
    """A standard SAE with random weights: far from the identity, so a wrong layout shows."""
    torch.manual_seed(seed)
    sae = StandardSAE(make_sae_config("standard", d_in, 2 * d_in, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def ce_with_hook(model: Any, tokens: torch.Tensor, hook: Any) -> float:
    return next_token_ce(model.run_with_hooks(tokens, fwd_hooks=[(Z_HOOK, hook)]), tokens)


def test_splice_on_hook_z_reads_and_writes_the_concatenated_heads(hook_z: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(splice_hook(identity_sae(N_HEADS * D_HEAD))(hook_z), hook_z)
        assert torch.equal(splice_hook(zero_sae(N_HEADS * D_HEAD))(hook_z), torch.zeros_like(hook_z))
        # By hand: heads concatenated in order, [batch, pos, n_heads * d_head], through the SAE.
        sae = random_sae(N_HEADS * D_HEAD)
        expected = sae(hook_z.reshape(16, 32, N_HEADS * D_HEAD)).reshape(hook_z.shape)
        out = splice_hook(sae)(hook_z)
    assert out.shape == hook_z.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, hook_z, atol=1e-2)


def test_splice_on_hook_z_replaces_only_the_sae_head(hook_z: torch.Tensor) -> None:
    head = 1
    others = [h for h in range(N_HEADS) if h != head]
    metadata = {"hook_head_index": head}
    with torch.no_grad():
        torch.testing.assert_close(splice_hook(identity_sae(D_HEAD, metadata=metadata))(hook_z), hook_z)
        zeroed = splice_hook(zero_sae(D_HEAD, metadata=metadata))(hook_z)
        assert torch.equal(zeroed[:, :, head], torch.zeros_like(hook_z[:, :, head]))
        assert torch.equal(zeroed[:, :, others], hook_z[:, :, others])  # untouched, bit for bit
        sae = random_sae(D_HEAD, metadata=metadata)
        out = splice_hook(sae)(hook_z)
        torch.testing.assert_close(out[:, :, head], sae(hook_z[:, :, head]), rtol=0, atol=0)
        assert torch.equal(out[:, :, others], hook_z[:, :, others])
        # An explicit head_index wins over the SAE's metadata.
        moved = splice_hook(sae, head_index=3)(hook_z)
        torch.testing.assert_close(moved[:, :, 3], sae(hook_z[:, :, 3]), rtol=0, atol=0)
        assert torch.equal(moved[:, :, :3], hook_z[:, :, :3])
    assert not torch.allclose(out[:, :, head], hook_z[:, :, head], atol=1e-2)


def test_model_metrics_on_hook_z_with_concatenated_heads(
    tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor
) -> None:
    identity = model_metrics(tiny_gpt2, identity_sae(N_HEADS * D_HEAD), tiny_gpt2_tokens, Z_HOOK)
    assert identity["ce_loss_with_sae"] == pytest.approx(identity["ce_loss_clean"], abs=1e-5)
    assert identity["ce_score"] == pytest.approx(1.0, abs=1e-4)
    assert identity["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    # Zeroing hook_z (every head) hurts the model, so the scores mean something here.
    assert identity["ce_loss_zero_ablated"] > identity["ce_loss_clean"] + 0.1
    zero = model_metrics(tiny_gpt2, zero_sae(N_HEADS * D_HEAD), tiny_gpt2_tokens, Z_HOOK)
    assert zero["ce_loss_with_sae"] == pytest.approx(zero["ce_loss_zero_ablated"], abs=1e-5)
    assert zero["ce_score"] == pytest.approx(0.0, abs=1e-4)


def test_model_metrics_on_hook_z_with_one_head(tiny_gpt2: Any, tiny_gpt2_tokens: torch.Tensor) -> None:
    head = 2
    tokens = tiny_gpt2_tokens
    identity = model_metrics(
        tiny_gpt2, identity_sae(D_HEAD, metadata={"hook_head_index": head}), tokens, Z_HOOK
    )
    assert identity["ce_loss_with_sae"] == pytest.approx(identity["ce_loss_clean"], abs=1e-5)
    assert identity["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)

    zero = model_metrics(tiny_gpt2, zero_sae(D_HEAD, metadata={"hook_head_index": head}), tokens, Z_HOOK)

    def zero_one_head(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        out = activation.clone()
        out[:, :, head] = 0
        return out

    # The SAE's CE is exactly that of zeroing this one head by hand, not of zeroing every head.
    one_head_ce = ce_with_hook(tiny_gpt2, tokens, zero_one_head)
    assert zero["ce_loss_with_sae"] == pytest.approx(one_head_ce, rel=1e-5)
    assert zero["ce_loss_zero_ablated"] == pytest.approx(
        ce_with_hook(tiny_gpt2, tokens, zero_ablate_hook), rel=1e-5
    )
    assert abs(zero["ce_loss_with_sae"] - zero["ce_loss_zero_ablated"]) > 1e-3
