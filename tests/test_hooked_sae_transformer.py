"""Splicing SAEs into a TransformerLens 4 bridge: the tiny GPT-2 and the real all-MiniLM-L6-v2.

Expected values are computed by hand from the SAE's weights and the clean model's activations; the
comparison model for "the SAE really runs at the canonical point" is the plain bridge with a
`run_with_hooks` hook that does the replacement itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from sae_lens import SAELensError, SparseAutoencoder
from sae_lens.hooked_sae_transformer import SAE_HOOK_NAMES, HookedSAETransformer, SplicedSAE
from sae_lens.models import all_special_ids, load_model
from tests.conftest import make_sae_config, tiny_rows

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class Case:
    """A model to splice into and a batch of its tokens (special tokens included)."""

    name: str
    model: HookedSAETransformer
    tokens: torch.Tensor
    d_model: int
    n_heads: int
    d_head: int


@pytest.fixture(scope="module")
def gpt2_case(tiny_gpt2_dir: Path) -> Case:
    model = HookedSAETransformer.boot_transformers(str(tiny_gpt2_dir))
    tokens = tiny_rows(model.tokenizer, 2, seed=3)[:, :12]  # BOS at position 0
    return Case("gpt2", model, tokens, 64, 4, 16)


@pytest.fixture(scope="module")
def minilm_case(offline_env: dict[str, str]) -> Case:
    # A fresh load (through the MiniLM alias): the session's `minilm` bridge is left untouched.
    model = HookedSAETransformer.boot_transformers(MINILM)
    tokens = model.to_tokens("the quick brown fox jumps")  # [CLS] ... [SEP]
    return Case("minilm", model, tokens, 384, 12, 32)


@pytest.fixture(params=["gpt2", "minilm"])
def case(request: pytest.FixtureRequest) -> Any:
    case = request.getfixturevalue(f"{request.param}_case")
    yield case
    case.model.reset_saes()
    case.model.reset_hooks()
    case.model.zero_grad(set_to_none=True)


def make_sae(
    d_in: int, hook_name: str, *, architecture: str = "standard", seed: int = 0, **options: Any
) -> Any:
    """A random SAE reading `hook_name` (metadata keys and config options in `options`), with every
    parameter perturbed so biases are not zero."""
    metadata = {"hook_name": hook_name}
    for key in ("hook_name_out", "hook_head_index", "exclude_special_tokens"):
        if key in options:
            metadata[key] = options.pop(key)
    cfg = make_sae_config(architecture, d_in=d_in, d_sae=2 * d_in, metadata=metadata, **options)
    torch.manual_seed(seed)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return sae


def clean_activations(model: Any, tokens: torch.Tensor, *names: str) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, names_filter=list(names))
    return {name: cache[name] for name in names}


def captured(
    model: HookedSAETransformer, tokens: torch.Tensor, names: list[str], **run: Any
) -> dict[str, Any]:
    """The activations at `names` (copied) and the logits, from `run_with_hooks_with_saes(**run)`."""
    seen: dict[str, Any] = {}

    def capture(activation: torch.Tensor, hook: Any) -> None:
        seen[hook_names[id(hook)]] = activation.detach().clone()

    hook_names: dict[int, str] = {}
    extra = run.pop("fwd_hooks", [])
    with model.saes(run.pop("saes", []), use_error_term=run.pop("use_error_term", False)):
        hook_dict = model.hook_dict
        for name in names:
            hook_names[id(hook_dict[name])] = name
        seen["logits"] = model.run_with_hooks(
            tokens, fwd_hooks=[*extra, *((n, capture) for n in names)], **run
        )
    return seen


# -- construction ---------------------------------------------------------------------------------


def test_boot_and_from_bridge_behave_as_the_plain_bridge(
    gpt2_case: Case, minilm_case: Case, tiny_gpt2: Any, tiny_gpt2_dir: Path, minilm: Any
) -> None:
    for case, plain in ((gpt2_case, tiny_gpt2), (minilm_case, minilm)):
        assert isinstance(case.model, HookedSAETransformer) and isinstance(case.model, TransformerBridge)
        # The last block's output: MiniLM's masked-LM head is not in its checkpoint (random per load).
        final = f"blocks.{plain.cfg.n_layers - 1}.hook_resid_post"
        ours, theirs = (
            clean_activations(case.model, case.tokens, final),
            clean_activations(plain, case.tokens, final),
        )
        assert torch.equal(ours[final], theirs[final])

    bridge = load_model(str(tiny_gpt2_dir))
    weights = {name: parameter.data_ptr() for name, parameter in bridge.named_parameters()}
    logits = bridge(gpt2_case.tokens)
    wrapped = HookedSAETransformer.from_bridge(bridge)
    assert wrapped is bridge and isinstance(wrapped, HookedSAETransformer)
    assert {name: parameter.data_ptr() for name, parameter in wrapped.named_parameters()} == weights
    assert torch.equal(wrapped(gpt2_case.tokens), logits)
    assert HookedSAETransformer.from_bridge(wrapped) is wrapped
    with pytest.raises(SAELensError, match="takes a TransformerBridge"):
        HookedSAETransformer.from_bridge(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# -- the error term -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook_name", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
)
def test_error_term_gives_the_clean_output_exactly(case: Case, hook_name: str) -> None:
    model, tokens = case.model, case.tokens
    sae = make_sae(case.d_model, hook_name)
    clean_logits = model(tokens)
    x = clean_activations(model, tokens, hook_name)[hook_name]

    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)

    assert torch.equal(logits, clean_logits)
    assert torch.equal(cache[hook_name], x)  # the spliced point passes the clean activation on
    with torch.no_grad():
        torch.testing.assert_close(cache[f"{hook_name}.hook_sae_error"], x - sae(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"{hook_name}.hook_sae_recons"], sae(x), atol=1e-5, rtol=0)
    assert not model.acts_to_saes


@pytest.mark.parametrize("architecture", ["standard", "topk", "gated", "jumprelu"])
def test_error_term_is_exact_for_every_architecture(gpt2_case: Case, architecture: str) -> None:
    model, tokens = gpt2_case.model, gpt2_case.tokens
    options = {"k": 8} if architecture == "topk" else {}
    sae = make_sae(64, "blocks.0.hook_resid_post", architecture=architecture, **options)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    x = cache["blocks.0.hook_resid_post.hook_sae_input"]
    with torch.no_grad():
        # acts_post is the architecture's own encode (the gate included for gated SAEs).
        torch.testing.assert_close(cache["blocks.0.hook_resid_post.hook_sae_acts_post"], sae.encode(x))
        torch.testing.assert_close(cache["blocks.0.hook_resid_post.hook_sae_acts_pre"], sae.encode_pre(x))
        assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), model(tokens))


# -- the SAE runs where the hook name points ------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "expected_canonical"),
    [
        ("blocks.1.hook_resid_pre", {"gpt2": "blocks.1.hook_in", "minilm": "blocks.1.hook_in"}),
        ("blocks.1.hook_resid_post", {"gpt2": "blocks.1.hook_out", "minilm": "blocks.1.hook_out"}),
        ("blocks.1.hook_mlp_out", {"gpt2": "blocks.1.mlp.hook_out", "minilm": "blocks.1.mlp.out.hook_out"}),
    ],
)
def test_alias_and_canonical_names_splice_at_the_same_point(
    case: Case, alias: str, expected_canonical: dict[str, str]
) -> None:
    model, tokens = case.model, case.tokens
    canonical = model.hook_dict[alias].name
    assert canonical == expected_canonical[case.name]
    by_alias = make_sae(case.d_model, alias)
    by_canonical = make_sae(case.d_model, canonical)  # same seed: the same weights

    def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return by_alias(activation)

    reference = model.run_with_hooks(tokens, fwd_hooks=[(alias, replace)])
    logits_alias, cache = model.run_with_cache_with_saes(tokens, saes=[by_alias])
    logits_canonical = model.run_with_saes(tokens, saes=[by_canonical])

    torch.testing.assert_close(logits_alias, reference, atol=1e-5, rtol=0)
    assert torch.equal(logits_alias, logits_canonical)
    assert (logits_alias - model(tokens)).abs().max() > 1e-3
    for name in (alias, canonical):
        for suffix in SAE_HOOK_NAMES[:4] + SAE_HOOK_NAMES[5:]:
            assert f"{name}.{suffix}" in cache
    assert f"{alias}.hook_sae_error" not in cache  # only with the error term

    model.add_sae(by_alias)
    hook_dict = model.hook_dict
    assert isinstance(hook_dict[alias], SplicedSAE) and hook_dict[alias] is hook_dict[canonical]
    assert f"{canonical}.hook_sae_acts_post" in hook_dict and f"{alias}.hook_sae_acts_post" in hook_dict


# -- editing features -----------------------------------------------------------------------------


def test_zero_ablating_a_feature_changes_the_activation_by_its_decoder_direction(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name = "blocks.0.hook_resid_post"
    sae = make_sae(case.d_model, hook_name)
    x = clean_activations(model, tokens, hook_name)[hook_name]
    with torch.no_grad():
        feature_acts = sae.encode(x)
    feature = int(feature_acts.amax(dim=(0, 1)).argmax())
    assert feature_acts[..., feature].max() > 0

    def ablate(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        acts = acts.clone()
        acts[..., feature] = 0
        return acts

    clean = captured(model, tokens, [hook_name], saes=[sae], use_error_term=True)
    edited = captured(
        model, tokens, [hook_name], saes=[sae], use_error_term=True,
        fwd_hooks=[(f"{hook_name}.hook_sae_acts_post", ablate)],
    )  # fmt: skip

    assert torch.equal(clean[hook_name], x)
    expected = -feature_acts[..., feature, None] * sae.W_dec[feature].detach()
    torch.testing.assert_close(edited[hook_name] - x, expected, atol=1e-5, rtol=0)
    assert (edited["logits"] - clean["logits"]).abs().max() > 1e-4


@pytest.mark.parametrize("where", ["hook_sae_acts_post", "hook_sae_output"])
def test_steering_adds_a_decoder_direction(case: Case, where: str) -> None:
    model, tokens = case.model, case.tokens
    hook_name, feature, alpha = "blocks.0.hook_resid_post", 5, 4.0
    sae = make_sae(case.d_model, hook_name)
    direction = sae.W_dec[feature].detach()

    def steer(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        if where == "hook_sae_acts_post":
            return activation + alpha * torch.nn.functional.one_hot(torch.tensor(feature), sae.cfg.d_sae)
        return activation + alpha * direction

    x = clean_activations(model, tokens, hook_name)[hook_name]
    steered = captured(
        model,
        tokens,
        [hook_name],
        saes=[sae],
        use_error_term=True,
        fwd_hooks=[(f"{hook_name}.{where}", steer)],
    )
    torch.testing.assert_close(steered[hook_name] - x, (alpha * direction).expand_as(x), atol=1e-5, rtol=0)
    assert (steered["logits"] - model(tokens)).abs().max() > 1e-4


# -- the cache ------------------------------------------------------------------------------------


def test_cache_holds_the_sae_hooks(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name = "blocks.1.hook_resid_pre"
    sae = make_sae(case.d_model, hook_name)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)

    batch, pos = tokens.shape
    x = cache[f"{hook_name}.hook_sae_input"]
    assert x.shape == (batch, pos, case.d_model)
    assert cache[f"{hook_name}.hook_sae_acts_post"].shape == (batch, pos, sae.cfg.d_sae)
    with torch.no_grad():
        torch.testing.assert_close(cache[f"{hook_name}.hook_sae_acts_pre"], sae.encode_pre(x))
        torch.testing.assert_close(cache[f"{hook_name}.hook_sae_acts_post"], sae.encode(x))
        torch.testing.assert_close(cache[f"{hook_name}.hook_sae_recons"], sae(x))
    torch.testing.assert_close(
        cache[f"{hook_name}.hook_sae_output"],
        cache[f"{hook_name}.hook_sae_recons"] + cache[f"{hook_name}.hook_sae_error"],
    )
    assert torch.equal(cache[f"{hook_name}.hook_sae_output"], x)

    name = f"{hook_name}.hook_sae_acts_post"
    _, only = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=name)
    assert name in only and not any("hook_sae_recons" in key or "hook_sae_input" in key for key in only)
    torch.testing.assert_close(only[name], cache[name])
    assert not model.acts_to_saes and not any("hook_sae" in key for key in model.hook_dict)


# -- reset ----------------------------------------------------------------------------------------


def test_reset_gives_back_the_clean_model(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name = "blocks.1.hook_resid_pre"
    original = model.hook_dict[hook_name]
    calls: list[str] = []

    def zero(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        calls.append(hook.name)
        return torch.zeros_like(activation)

    clean_logits = model(tokens)
    zeroed_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, zero)])

    sae = make_sae(case.d_model, hook_name)
    model.add_sae(sae)
    assert isinstance(model.hook_dict[hook_name], SplicedSAE)
    assert (
        isinstance(model.blocks[1].hook_in, SplicedSAE)
        and model.blocks[1].hook_resid_pre is model.blocks[1].hook_in
    )
    assert not torch.equal(model(tokens), clean_logits)
    model.reset_saes()

    assert model.hook_dict[hook_name] is original and model.blocks[1].hook_in is original
    assert model.blocks[1].hook_resid_pre is original
    assert not any("hook_sae" in key for key in model.hook_dict)
    assert torch.equal(model(tokens), clean_logits)
    calls.clear()
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, zero)]), zeroed_logits)
    assert calls == ["blocks.1.hook_in"]


def test_saes_context_restores_a_displaced_sae(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name = "blocks.1.hook_resid_pre"
    first, second = make_sae(case.d_model, hook_name, seed=0), make_sae(case.d_model, hook_name, seed=1)
    model.add_sae(first, use_error_term=True)
    with model.saes([second]):
        assert model.acts_to_saes == {hook_name: second}
        assert not torch.equal(model(tokens), model.run_with_saes(tokens, saes=[first], use_error_term=True))
    assert model.acts_to_saes == {hook_name: first}
    assert model.hook_dict[hook_name].use_error_term
    model.reset_saes(hook_name)
    assert not model.acts_to_saes
    with pytest.raises(SAELensError, match="no SAE is attached"):
        model.reset_saes(hook_name)


def test_the_saes_own_hooks_fire_in_the_spliced_pass_only(gpt2_case: Case) -> None:
    model, tokens = gpt2_case.model, gpt2_case.tokens
    hook_name = "blocks.0.hook_resid_post"
    sae = make_sae(64, hook_name)
    x = clean_activations(model, tokens, hook_name)[hook_name]
    calls: list[int] = []

    def zero_all_latents(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        calls.append(1)
        return torch.zeros_like(acts)

    sae.hook_hidden_post.add_hook(zero_all_latents)
    try:
        spliced = captured(model, tokens, [hook_name], saes=[sae], use_error_term=True)[hook_name]
    finally:
        sae.reset_hooks()
    assert len(calls) == 1
    # The edit shows in full: recons is b_dec, the error comes from the unedited clean pass.
    with torch.no_grad():
        torch.testing.assert_close(spliced, sae.b_dec + (x - sae(x)), atol=1e-5, rtol=0)


# -- gradients ------------------------------------------------------------------------------------


def test_gradients_flow_only_through_the_sae_path(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name = "blocks.1.hook_resid_pre"  # its input is block 0's output, hook_resid_post
    sae = make_sae(case.d_model, hook_name)
    grads: dict[str, torch.Tensor] = {}
    errors: list[torch.Tensor] = []

    def save_grad(name: str) -> Any:
        def hook(grad: torch.Tensor, hook: Any) -> None:
            grads[name] = grad.detach().clone()

        return hook

    with (
        model.saes([sae], use_error_term=True),
        model.hooks(
            fwd_hooks=[(f"{hook_name}.hook_sae_error", lambda error, hook: errors.append(error))],
            bwd_hooks=[
                ("blocks.0.hook_resid_post", save_grad("upstream")),
                (f"{hook_name}.hook_sae_input", save_grad("sae_input")),
            ],
        ),
    ):
        logits = model(tokens)
        logits.pow(2).mean().backward()

    for parameter in (sae.W_enc, sae.b_enc, sae.W_dec):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert not errors[0].requires_grad
    # Everything reaching the block's input went through the SAE: none bypassed it via the error term.
    assert grads["upstream"].abs().sum() > 0
    torch.testing.assert_close(grads["upstream"], grads["sae_input"])


# -- per-head hooks and transcoders ---------------------------------------------------------------


def test_hook_z_sae_on_all_heads_concatenated(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name, n_heads, d_head = "blocks.0.attn.hook_z", case.n_heads, case.d_head
    sae = make_sae(n_heads * d_head, hook_name)
    z = clean_activations(model, tokens, hook_name)[hook_name]
    assert z.shape[-2:] == (n_heads, d_head)

    def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return sae(activation.flatten(-2)).unflatten(-1, (n_heads, d_head))

    spliced = captured(model, tokens, [hook_name], saes=[sae])
    with torch.no_grad():
        torch.testing.assert_close(spliced[hook_name], replace(z, None))
    torch.testing.assert_close(
        spliced["logits"], model.run_with_hooks(tokens, fwd_hooks=[(hook_name, replace)]), atol=1e-5, rtol=0
    )
    assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), model(tokens))


def test_hook_z_sae_on_one_head(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name, head = "blocks.0.attn.hook_z", 1
    sae = make_sae(case.d_head, hook_name, hook_head_index=head)
    z = clean_activations(model, tokens, hook_name)[hook_name]

    spliced = captured(model, tokens, [hook_name], saes=[sae])[hook_name]

    others = [h for h in range(case.n_heads) if h != head]
    assert torch.equal(spliced[:, :, others], z[:, :, others])
    with torch.no_grad():
        torch.testing.assert_close(spliced[:, :, head], sae(z[:, :, head]))
    assert not torch.allclose(spliced[:, :, head], z[:, :, head])


def test_transcoder_reads_one_hook_and_writes_another(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_in, hook_out = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"
    transcoder = make_sae(case.d_model, hook_in, hook_name_out=hook_out, skip_connection=True)
    assert transcoder.cfg.is_transcoder
    clean = clean_activations(model, tokens, hook_in, hook_out)

    spliced = captured(model, tokens, [hook_in, hook_out, f"{hook_out}.hook_sae_input"], saes=[transcoder])

    assert torch.equal(spliced[hook_in], clean[hook_in])  # the input hook is left as it is
    assert torch.equal(spliced[f"{hook_out}.hook_sae_input"], clean[hook_in])
    with torch.no_grad():
        by_hand = transcoder.decode(transcoder.encode(clean[hook_in])) + clean[hook_in] @ transcoder.W_skip
    torch.testing.assert_close(spliced[hook_out], by_hand)
    assert not torch.allclose(spliced[hook_out], clean[hook_out])
    assert (spliced["logits"] - model(tokens)).abs().max() > 1e-3
    assert torch.equal(model.run_with_saes(tokens, saes=[transcoder], use_error_term=True), model(tokens))

    # It reads what the model passes on at its input hook, after the hooks there.
    def zero(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(activation)

    patched = captured(model, tokens, [hook_out], saes=[transcoder], fwd_hooks=[(hook_in, zero)])
    with torch.no_grad():
        zeros = torch.zeros_like(clean[hook_in])
        torch.testing.assert_close(patched[hook_out], transcoder(zeros).expand_as(patched[hook_out]))


# -- special tokens -------------------------------------------------------------------------------


def test_special_tokens_keep_their_clean_activation(case: Case) -> None:
    model, tokens = case.model, case.tokens
    hook_name = "blocks.1.hook_resid_pre"
    x = clean_activations(model, tokens, hook_name)[hook_name]
    special = torch.isin(tokens, torch.tensor(all_special_ids(model.tokenizer)))
    assert special.any() and (~special).any()

    kept = make_sae(case.d_model, hook_name, exclude_special_tokens=True)
    spliced = captured(model, tokens, [hook_name], saes=[kept])[hook_name]
    assert torch.equal(spliced[special], x[special])
    with torch.no_grad():
        torch.testing.assert_close(spliced[~special], kept(x)[~special])

    # Without the setting every position is replaced, special ones included.
    replaced = captured(model, tokens, [hook_name], saes=[make_sae(case.d_model, hook_name)])[hook_name]
    assert not torch.allclose(replaced[special], x[special])

    # A list of ids keeps only those.
    first_id = int(tokens[0, 0])
    listed = make_sae(case.d_model, hook_name, exclude_special_tokens=[first_id])
    spliced = captured(model, tokens, [hook_name], saes=[listed])[hook_name]
    assert torch.equal(spliced[tokens == first_id], x[tokens == first_id])
    other = special & (tokens != first_id)
    if other.any():
        assert not torch.allclose(spliced[other], x[other])


# -- errors ---------------------------------------------------------------------------------------


def test_errors_name_the_problem(gpt2_case: Case) -> None:
    model, tokens = gpt2_case.model, gpt2_case.tokens
    with pytest.raises(SAELensError, match="not found; the model has 2 blocks"):
        model.add_sae(make_sae(64, "blocks.9.hook_resid_pre"))
    no_hook = make_sae(64, "blocks.0.hook_resid_pre")
    no_hook.cfg.metadata.pop("hook_name")
    with pytest.raises(SAELensError, match="no hook_name"):
        model.add_sae(no_hook)
    with pytest.raises(SAELensError, match="set_use_hook_mlp_in"):
        model.add_sae(make_sae(64, "blocks.0.hook_mlp_in"))
    with pytest.raises(SAELensError, match="spliced SAE's own hook"):
        model.add_sae(make_sae(64, "blocks.0.hook_resid_pre.hook_sae_output"))
    with pytest.raises(SAELensError, match=r"d_in=32 does not fit 'blocks\.0\.hook_in'"):
        model.run_with_saes(tokens, saes=[make_sae(32, "blocks.0.hook_resid_pre")])
    assert not model.acts_to_saes
    embeds = model.embed(tokens) + model.pos_embed(torch.arange(tokens.shape[1]))
    assert isinstance(model.hook_dict["blocks.0.hook_resid_pre"], HookPoint)
    with pytest.raises(SAELensError, match="no input ids"):
        model.run_with_saes(
            embeds,
            saes=[make_sae(64, "blocks.1.hook_resid_pre", exclude_special_tokens=True)],
            start_at_layer=0,
        )
