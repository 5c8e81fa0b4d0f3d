"""The SAE base class (sae_lens/saes/sae.py): encode/decode maths by hand, hooks, decoder-norm
maintenance, weight folding, architecture dispatch, configs, the training-step output and saving."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens.errors import SAELensError
from sae_lens.saes import (
    SAEConfig,
    SparseAutoencoder,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TrainStepOutput,
    get_architecture_class,
    registered_architectures,
)
from sae_lens.saes.sae import latent_fire_counts
from tests.conftest import make_runner_config, make_sae_config
from tests.saes.helpers import F64, HAND_X, hand_sae, make_sae, rand_x, randomise

# -- encode / decode ----------------------------------------------------------------------------------


def test_standard_encode_decode_by_hand_with_b_dec_subtracted() -> None:
    sae = hand_sae(apply_b_dec_to_input=True)
    # token 0: sae_in = [1, 2] - [.5, -.5] = [.5, 2.5]
    #   pre = [.5, 2.5 - 1, .5 - 2.5 + .5] = [.5, 1.5, -1.5] -> relu [.5, 1.5, 0]
    #   out = .5 * [1, 0] + 1.5 * [0, 1] + b_dec = [.5, 1.5] + [.5, -.5] = [1, 1]
    # token 1: sae_in = [3, 0] - b_dec = [2.5, .5]
    #   pre = [2.5, .5 - 1, 2.5 - .5 + .5] = [2.5, -.5, 2.5] -> relu [2.5, 0, 2.5]
    #   out = [2.5, 0] + 2.5 * [1, 1] + b_dec = [5, 2.5] + [.5, -.5] = [5.5, 2]
    pre = sae.encode_pre(HAND_X)
    torch.testing.assert_close(pre, torch.tensor([[0.5, 1.5, -1.5], [2.5, -0.5, 2.5]], dtype=F64))
    acts = sae.encode(HAND_X)
    torch.testing.assert_close(acts, torch.tensor([[0.5, 1.5, 0.0], [2.5, 0.0, 2.5]], dtype=F64))
    out = sae.decode(acts)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [5.5, 2.0]], dtype=F64))
    torch.testing.assert_close(sae(HAND_X), out)


def test_standard_encode_decode_by_hand_without_b_dec_subtracted() -> None:
    sae = hand_sae(apply_b_dec_to_input=False)
    # token 0: sae_in = [1, 2]; pre = [1, 2 - 1, 1 - 2 + .5] = [1, 1, -.5] -> relu [1, 1, 0]
    #   out = [1, 1] + [.5, -.5] = [1.5, .5]
    # token 1: sae_in = [3, 0]; pre = [3, -1, 3.5] -> relu [3, 0, 3.5]
    #   out = [3, 0] + 3.5 * [1, 1] + [.5, -.5] = [7, 3]
    pre = sae.encode_pre(HAND_X)
    torch.testing.assert_close(pre, torch.tensor([[1.0, 1.0, -0.5], [3.0, -1.0, 3.5]], dtype=F64))
    acts = sae.encode(HAND_X)
    torch.testing.assert_close(acts, torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 3.5]], dtype=F64))
    torch.testing.assert_close(sae(HAND_X), torch.tensor([[1.5, 0.5], [7.0, 3.0]], dtype=F64))


def test_hooks_see_the_intermediate_values() -> None:
    sae = hand_sae()
    _, cache = sae.run_with_cache(HAND_X)
    torch.testing.assert_close(cache["hook_hidden_pre"], sae.encode_pre(HAND_X))
    torch.testing.assert_close(cache["hook_hidden_post"], sae.encode(HAND_X))
    torch.testing.assert_close(cache["hook_sae_out"], sae(HAND_X))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encoder_input_is_x_minus_b_dec_and_its_path_term_is_zero(apply_b_dec: bool) -> None:
    """The one encoder-input path: `sae_in` is x - b_dec (or x), and the b_dec path term is exactly
    zero but carries b_dec's encoder gradient, -W_enc @ dL/dpre."""
    sae = randomise(make_sae(apply_b_dec_to_input=apply_b_dec))
    x = rand_x(5, 6)
    sae_in, path = sae.encoder_input(x)
    torch.testing.assert_close(sae_in, x - sae.b_dec.detach() if apply_b_dec else x, rtol=0, atol=0)
    assert path.shape == (10,) and torch.count_nonzero(path) == 0
    pre = sae.encode_pre(x)
    g = rand_x(5, 10, seed=3)
    (ours,) = torch.autograd.grad(pre, sae.b_dec, g, allow_unused=True, materialize_grads=True)
    want = -(sae.W_enc.detach() @ g.sum(0)) if apply_b_dec else torch.zeros(6, dtype=F64)
    torch.testing.assert_close(ours, want)


# -- decoder-norm maintenance -------------------------------------------------------------------------


def test_remove_parallel_gradient_by_hand() -> None:
    sae = make_sae(d_in=2, d_sae=1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0]]))
    sae.W_dec.grad = torch.tensor([[1.0, 2.0]], dtype=F64)
    sae.remove_gradient_parallel_to_decoder_directions()
    # unit row u = [.6, .8]; <g, u> = .6 + 1.6 = 2.2; g - 2.2 u = [1 - 1.32, 2 - 1.76]
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[-0.32, 0.24]], dtype=F64))
    assert float(sae.W_dec.grad @ sae.W_dec.detach()[0]) == pytest.approx(0.0, abs=1e-12)


def test_remove_parallel_gradient_keeps_perpendicular_part() -> None:
    sae = randomise(make_sae(), dec_scale=True)
    grad = rand_x(10, 6, seed=5)
    sae.W_dec.grad = grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    W = sae.W_dec.detach()
    new = sae.W_dec.grad
    for i in range(10):
        u = W[i] / W[i].norm()
        assert float(new[i] @ W[i]) == pytest.approx(0.0, abs=1e-10)
        perpendicular = grad[i] - (grad[i] @ u) * u
        torch.testing.assert_close(new[i], perpendicular)
    # No gradient: nothing to do, and no error.
    sae.W_dec.grad = None
    sae.remove_gradient_parallel_to_decoder_directions()
    assert sae.W_dec.grad is None


def test_set_decoder_norm_to_unit_norm() -> None:
    sae = randomise(make_sae(), dec_scale=True)
    directions = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10, dtype=F64))
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10, dtype=F64))
    torch.testing.assert_close(sae.W_dec.detach(), directions)


def test_fresh_sae_has_unit_decoder_rows_and_tied_encoder() -> None:
    sae = make_sae(d_in=5, d_sae=7)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(7, dtype=F64))
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().T)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0


def test_decoder_init_norm_sets_the_row_norms() -> None:
    sae = make_sae(d_in=5, d_sae=7, decoder_init_norm=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((7,), 0.1, dtype=F64))
    torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().T)


# -- folding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_W_dec_norm_keeps_outputs(apply_b_dec: bool) -> None:
    sae = randomise(make_sae(apply_b_dec_to_input=apply_b_dec), dec_scale=True)
    x = rand_x(11, 6)
    before = sae(x).detach()
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x).detach(), before)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10, dtype=F64))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fold_activation_norm_scaling_factor(architecture: str, apply_b_dec: bool) -> None:
    kw: dict[str, Any] = {"k": 3} if architecture == "topk" else {}
    # The input scale is training state (trainer.state.input_scale), not an SAE config field.
    sae = make_sae(architecture, apply_b_dec_to_input=apply_b_dec, **kw)
    sae = randomise(sae)
    x = rand_x(11, 6)
    s = 3.7
    expected = sae(s * x).detach() / s
    sae.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(sae(x).detach(), expected)
    assert not hasattr(sae.cfg, "normalize_activations")
    assert sae.cfg.to_dict()["normalize_activations"] == "none"


def test_save_model_folds_the_input_scale_into_a_copy(tmp_path: Path) -> None:
    sae = randomise(make_sae("topk", k=3))
    before = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    x = rand_x(11, 6)
    s = 2.5
    folder = sae.save_model(tmp_path / "sae", input_scale=s)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # the training copy is untouched
    loaded = SparseAutoencoder.load_from_disk(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(s * x) / s)
    assert not torch.equal(loaded.W_enc, sae.W_enc)


# -- architecture dispatch and configs ----------------------------------------------------------------


def test_registered_architectures_are_sorted() -> None:
    names = registered_architectures()
    assert names == sorted(names)
    assert {"batchtopk", "gated", "jumprelu", "matryoshka_batchtopk", "standard", "topk"} <= set(names)


def test_constructor_dispatches_on_architecture() -> None:
    assert {"standard", "topk"} <= set(registered_architectures())
    standard = SparseAutoencoder(make_sae_config("standard", 4, 8))
    assert type(standard) is StandardSAE
    topk = SparseAutoencoder(make_sae_config("topk", 4, 8, k=2))
    assert type(topk) is TopKSAE and topk.k == 2
    assert type(SparseAutoencoder.from_config(make_sae_config("topk", 4, 8, k=2))) is TopKSAE
    assert type(SparseAutoencoder.from_config(make_sae_config("standard", 4, 8))) is StandardSAE
    # The subclass can be called directly too.
    assert type(TopKSAE(make_sae_config("topk", 4, 8, k=2))) is TopKSAE


def test_each_architecture_declares_its_own_config_class() -> None:
    for name in registered_architectures():
        cls = get_architecture_class(name)
        assert cls.architecture_name == name
        assert cls.config_class.architecture == name
        assert issubclass(cls.config_class, SAEConfig)
    assert not hasattr(SAEConfig(d_in=4, d_sae=8), "k")
    assert "architecture" not in {f.name for f in dataclasses.fields(SAEConfig)}


def test_a_subclass_rejects_another_architectures_config() -> None:
    with pytest.raises(SAELensError, match="TopKSAEConfig"):
        TopKSAE(make_sae_config("standard", 4, 8))


def test_constructor_accepts_runner_config() -> None:
    cfg = make_runner_config(d_in=4, d_sae=8, k=2, hook_point="blocks.1.hook_resid_post")
    sae = SparseAutoencoder(cfg)
    assert type(sae) is TopKSAE
    assert sae.cfg.d_sae == 8 and sae.cfg.k == 2
    assert sae.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata["hook_layer"] == 1
    # Without d_in there is nothing to build.
    with pytest.raises(SAELensError, match="d_in"):
        SparseAutoencoder(make_runner_config(d_sae=8, k=2))


def test_unknown_architecture_raises() -> None:
    values = {"architecture": "jumprelu-ish", "d_in": 4, "d_sae": 8}
    with pytest.raises(SAELensError, match="jumprelu-ish") as info:
        SAEConfig.from_dict(values)
    assert "standard" in str(info.value) and "topk" in str(info.value)
    named = types.SimpleNamespace(architecture="jumprelu-ish")
    with pytest.raises(SAELensError, match="jumprelu-ish"):
        SparseAutoencoder(named)
    with pytest.raises(SAELensError):
        SparseAutoencoder.from_config(named)
    # The base config names no architecture at all.
    with pytest.raises(SAELensError, match="names no architecture"):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8))


def test_sae_config_validation() -> None:
    with pytest.raises(SAELensError, match="d_sae"):
        SAEConfig(d_in=4, d_sae=0)
    with pytest.raises(SAELensError, match="dtype"):
        SAEConfig(d_in=4, d_sae=8, dtype="int8")
    with pytest.raises(SAELensError, match="decoder_init_norm"):
        StandardSAEConfig(d_in=4, d_sae=8, decoder_init_norm=0.0)
    assert SAEConfig(d_in=4, d_sae=8, dtype="torch.bfloat16").dtype == "bfloat16"


def test_from_dict_builds_the_named_subclass_and_ignores_unknown_keys() -> None:
    cfg = SAEConfig.from_dict(
        {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 3, "normalize_activations": "none", "zzz": 1}
    )
    assert type(cfg) is TopKSAEConfig and cfg.k == 3
    assert cfg == TopKSAEConfig(d_in=4, d_sae=8, k=3)
    # Without "architecture", the class it is called on decides.
    assert type(TopKSAEConfig.from_dict({"d_in": 4, "d_sae": 64})) is TopKSAEConfig


def test_option_names_and_defaults_are_the_architectures_own() -> None:
    standard = set(StandardSAEConfig.option_names())
    assert {
        "apply_b_dec_to_input",
        "decoder_init_norm",
        "l1_coefficient",
        "lp_norm",
        "use_ghost_grads",
    } <= standard
    assert not {"d_in", "d_sae", "dtype", "device", "metadata", "k"} & standard
    defaults = TopKSAEConfig.option_defaults()
    assert set(defaults) == set(TopKSAEConfig.option_names())
    assert {"k": 32, "aux_k": None, "aux_k_coefficient": 8.0, "apply_b_dec_to_input": True}.items() <= (
        defaults.items()
    )
    assert "l1_coefficient" not in defaults


def test_kernel_backend_is_an_instance_setting() -> None:
    a, b = make_sae("topk", k=3), make_sae("topk", k=3)
    assert a.kernel_backend == "auto"
    a.kernel_backend = "index"
    assert a.kernel_backend == "index" and b.kernel_backend == "auto"


# -- the training-step output -------------------------------------------------------------------------

# Per architecture: extra options, and the loss names with and without dead latents.
STEP_CASES: dict[str, tuple[dict[str, Any], set[str], set[str]]] = {
    "standard": ({"use_ghost_grads": True}, {"mse", "l1"}, {"mse", "l1", "ghost_grad"}),
    "topk": ({"k": 3}, {"mse"}, {"mse", "aux_k"}),
    "batchtopk": ({"k": 3}, {"mse"}, {"mse", "aux_k"}),
    "matryoshka_batchtopk": (
        {"k": 3, "matryoshka_widths": [3, 6, 12]},
        {"mse", "matryoshka_prefix_0", "matryoshka_prefix_1"},
        {"mse", "matryoshka_prefix_0", "matryoshka_prefix_1", "aux_k"},
    ),
    "jumprelu": ({}, {"mse", "l0"}, {"mse", "l0"}),
    "gated": ({}, {"mse", "l1", "gated_aux"}, {"mse", "l1", "gated_aux"}),
}
SPARSITY = ("l1", "l0")
DEAD_LATENT = ("ghost_grad", "aux_k", "gated_aux")


def test_step_cases_cover_every_registered_architecture() -> None:
    assert set(STEP_CASES) == set(registered_architectures())


@pytest.mark.parametrize("architecture", sorted(STEP_CASES))
@pytest.mark.parametrize("with_dead", [False, True])
def test_train_step_output_losses_and_seed_era_view(architecture: str, with_dead: bool) -> None:
    options, names, names_with_dead = STEP_CASES[architecture]
    sae = make_sae(architecture, d_in=6, d_sae=12, **options)
    if hasattr(sae, "b_enc"):  # gated has b_gate and b_mag instead
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)
    x = rand_x(20, 6)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[::2] = with_dead
    out = sae.training_forward_pass(x, dead, l1_coefficient=0.1)
    assert isinstance(out, TrainStepOutput)
    assert set(out.losses) == (names_with_dead if with_dead else names)
    assert all(value.ndim == 0 for value in out.losses.values())
    # `loss` is the sum of the named terms, in their order.
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()), rel=1e-12, abs=0)

    sae_out, feature_acts, loss, mse_loss, l1_loss, ghost_grad_loss = out
    assert len(out) == 6 and out[2] is out.loss
    assert sae_out is out.sae_out and feature_acts is out.feature_acts and loss is out.loss
    assert sae_out.shape == (20, 6) and feature_acts.shape == (20, 12)
    assert not feature_acts.requires_grad
    assert torch.equal(mse_loss, out.losses["mse"]) and torch.equal(out.mse_loss, mse_loss)
    expected_l1 = sum(v.item() for n, v in out.losses.items() if n in SPARSITY)
    expected_aux = sum(v.item() for n, v in out.losses.items() if n in DEAD_LATENT)
    assert l1_loss.item() == pytest.approx(expected_l1, rel=1e-12, abs=0)
    assert ghost_grad_loss.item() == pytest.approx(expected_aux, rel=1e-12, abs=0)
    assert out.l1_loss.item() == l1_loss.item() and out.ghost_grad_loss.item() == ghost_grad_loss.item()
    mse = ((sae_out.detach() - x) ** 2).sum(-1).mean()
    assert mse_loss.item() == pytest.approx(mse.item(), rel=1e-12)
    assert out.loss.requires_grad


# -- saved configs ------------------------------------------------------------------------------------

SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "standard": {"l1_coefficient": 0.25, "lp_norm": 2.0, "use_ghost_grads": True},
    "topk": {"k": 3, "aux_k": 5},
    "batchtopk": {"k": 3, "topk_threshold_lr": 0.5},
    "matryoshka_batchtopk": {"k": 3, "matryoshka_widths": [4, 12]},
    "jumprelu": {"jumprelu_bandwidth": 0.05, "target_l0": 4.0},
    "gated": {"l1_coefficient": 0.5},
}


def test_save_options_cover_every_registered_architecture() -> None:
    assert set(SAVE_OPTIONS) == set(registered_architectures())


@pytest.mark.parametrize("architecture", sorted(SAVE_OPTIONS))
def test_saved_cfg_json_holds_only_the_architectures_fields(architecture: str, tmp_path: Path) -> None:
    sae = randomise(make_sae(architecture, d_in=6, d_sae=12, **SAVE_OPTIONS[architecture]))
    kw = {"as_jumprelu": False} if "batchtopk" in architecture else {}
    folder = sae.save_model(tmp_path / architecture, **kw)
    saved = json.loads((folder / "cfg.json").read_text())
    fields = {f.name for f in dataclasses.fields(type(sae.cfg))}
    assert set(saved) == fields | {"architecture", "normalize_activations"}
    assert saved["architecture"] == architecture and saved["normalize_activations"] == "none"
    for name, value in SAVE_OPTIONS[architecture].items():
        assert saved[name] == value, name
    if architecture in ("standard", "gated", "jumprelu"):
        assert not {"k", "aux_k", "aux_k_coefficient", "topk_threshold_lr"} & set(saved)
    if architecture in ("standard", "gated"):
        assert not [name for name in saved if name.startswith("jumprelu") or name == "target_l0"]
    if architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        assert not {"l1_coefficient", "lp_norm", "use_ghost_grads"} & set(saved)
    loaded = SparseAutoencoder.load_from_disk(folder)
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# -- firing counts ------------------------------------------------------------------------------------


def test_latent_fire_counts_dense_in_chunks_and_sparse() -> None:
    """Counts of tokens with a positive activation per latent, for a batch spanning several of the
    dense path's row chunks (2**22 elements each: 2 rows at this width) and for sparse COO input."""
    d_sae = 1 << 21
    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(5, d_sae, generator=gen).clamp_min(0)
    acts[:, :3] = torch.tensor([[1.0, 0.0, 2.0]] * 5)  # latent 0 fires 5 times, latent 1 never
    counts = latent_fire_counts(acts)
    assert counts.dtype == torch.long
    assert counts[:3].tolist() == [5, 0, 5]
    assert torch.equal(counts, (acts > 0).sum(dim=0))
    small = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])
    assert latent_fire_counts(small.to_sparse()).tolist() == [1, 2, 0]
