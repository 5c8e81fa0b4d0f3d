"""The training config: defaults, derived values, YAML, and the errors it gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from sae_lens.config import LanguageModelSAERunnerConfig, check_known_fields, coerce_field
from sae_lens.errors import SAELensError

Cfg = LanguageModelSAERunnerConfig


def test_defaults_build() -> None:
    cfg = Cfg()
    assert cfg.architecture == "topk"
    assert cfg.hook_point == "blocks.3.hook_resid_post"
    assert cfg.hook_layer == 3
    assert cfg.resolved_d_sae(384) == 16 * 384
    assert cfg.total_training_steps == 300_000 // 1024
    assert cfg == Cfg()


@pytest.mark.parametrize(
    ("hook_point", "layer"),
    [
        ("blocks.0.hook_resid_pre", 0),
        ("blocks.11.attn.hook_z", 11),
        ("blocks.7.hook_mlp_out", 7),
        ("hook_embed", 0),
    ],
)
def test_hook_layer_inferred_from_name(hook_point: str, layer: int) -> None:
    assert Cfg(hook_point=hook_point).hook_layer == layer


def test_explicit_hook_point_layer_wins_and_unnamed_hook_needs_it() -> None:
    assert Cfg(hook_point="blocks.4.hook_resid_pre", hook_point_layer=2).hook_layer == 2
    assert Cfg(hook_point="ln_final.hook_normalized", hook_point_layer=5).hook_layer == 5
    with pytest.raises(SAELensError, match="hook_point_layer"):
        Cfg(hook_point="ln_final.hook_normalized")


def test_d_sae_overrides_expansion_factor_and_total_steps() -> None:
    cfg = Cfg(d_sae=100, expansion_factor=4, total_training_tokens=1000, train_batch_size=300)
    assert cfg.resolved_d_sae(10) == 100
    assert Cfg(expansion_factor=4).resolved_d_sae(10) == 40
    assert cfg.total_training_steps == 3
    # Fewer tokens than one batch still trains one step.
    assert Cfg(total_training_tokens=10, train_batch_size=300).total_training_steps == 1


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = Cfg(
        architecture="standard",
        hook_point="blocks.1.hook_mlp_out",
        d_in=64,
        d_sae=128,
        k=8,
        lr=3e-4,
        lr_end=None,
        l1_coefficient=5.0,
        run_name="demo",
        use_ghost_grads=True,
        normalize_activations="expected_average_only_in",
    )
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    loaded = Cfg.from_yaml(path)
    assert loaded == cfg
    assert isinstance(loaded.lr, float) and loaded.lr_end is None and loaded.d_in == 64

    overridden = Cfg.from_yaml(path, lr=1e-2, run_name="other", d_sae=256)
    assert overridden.lr == 1e-2
    assert overridden.run_name == "other"
    assert overridden.d_sae == 256
    assert overridden.architecture == "standard"


def test_yaml_written_by_hand_with_strings(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "lr: '1e-3'\nuse_ghost_grads: 'true'\nlr_end: none\ncontext_size: '64'\nlr_decay_steps: '0.2'\n"
    )
    cfg = Cfg.from_yaml(path)
    assert cfg.lr == 1e-3 and cfg.use_ghost_grads is True and cfg.lr_end is None and cfg.context_size == 64
    assert cfg.lr_decay_steps == 0.2
    path.write_text("lr: auto\nlr_decay_steps: '200'\nmax_grad_norm: none\n")
    cfg = Cfg.from_yaml(path)
    assert (cfg.lr, cfg.lr_decay_steps, cfg.max_grad_norm) == ("auto", 200, None)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("lr_scheduler", "lr_scheduler_name"), ("l1_coeficient", "l1_coefficient"), ("hook_pont", "hook_point")],
)
def test_unknown_key_suggests_closest_field(key: str, suggestion: str) -> None:
    with pytest.raises(SAELensError, match=f"did you mean '{suggestion}'"):
        Cfg.from_dict({key: 1})
    with pytest.raises(SAELensError, match=key):
        check_known_fields(Cfg, {key: 1})


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    with pytest.raises(SAELensError, match="zzzzqqq") as info:
        Cfg.from_dict({"zzzzqqq": 1})
    assert "did you mean" not in str(info.value)
    path = tmp_path / "cfg.yaml"
    path.write_text("lr_scheduler: constant\n")
    with pytest.raises(SAELensError, match="lr_scheduler_name"):
        Cfg.from_yaml(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_size", 0),
        ("train_batch_size", -1),
        ("d_sae", 0),
        ("d_in", -4),
        ("k", 0),
        ("total_training_tokens", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr_warm_up_steps", -1),
        ("l1_coefficient", -0.1),
        ("lp_norm", 0.0),
        ("adam_beta1", 1.0),
    ],
)
def test_non_positive_values_raise_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(SAELensError, match=field):
        Cfg(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr_scheduler_name", "linear"),
        ("b_dec_init_method", "median"),
        ("architecture", "gated-ish"),
        ("normalize_activations", "layer_norm"),
        ("dtype", "int8"),
    ],
)
def test_invalid_choices_raise_naming_the_field(field: str, value: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(SAELensError, match=field) as info:
        Cfg(**kwargs)
    assert value in str(info.value)


def test_invalid_architecture_lists_registered_ones() -> None:
    with pytest.raises(SAELensError) as info:
        Cfg(architecture="gated-ish")
    assert "standard" in str(info.value) and "topk" in str(info.value)


def test_k_larger_than_d_sae_is_rejected() -> None:
    with pytest.raises(SAELensError, match="k"):
        Cfg(architecture="topk", d_sae=16, k=32)


def test_coerce_field_conversions() -> None:
    assert coerce_field(Cfg, "lr", "1e-3") == pytest.approx(1e-3)
    assert isinstance(coerce_field(Cfg, "lr", "1e-3"), float)
    assert coerce_field(Cfg, "use_ghost_grads", "true") is True
    assert coerce_field(Cfg, "use_ghost_grads", "False") is False
    assert coerce_field(Cfg, "use_ghost_grads", True) is True
    assert coerce_field(Cfg, "lr_end", "none") is None
    assert coerce_field(Cfg, "d_sae", "null") is None
    assert coerce_field(Cfg, "d_sae", "1024") == 1024
    assert coerce_field(Cfg, "total_training_tokens", "1e6") == 1_000_000
    assert coerce_field(Cfg, "context_size", 64.0) == 64
    assert coerce_field(Cfg, "hook_point", 12) == "12"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_size", "abc"),
        ("context_size", 1.5),
        ("context_size", "1.5"),
        ("context_size", "inf"),
        ("use_ghost_grads", "maybe"),
        ("adam_beta1", "fast"),
    ],
)
def test_coerce_field_rejects_with_field_name(field: str, value: Any) -> None:
    with pytest.raises(SAELensError, match=field) as info:
        coerce_field(Cfg, field, value)
    assert repr(value) in str(info.value)


def test_a_word_for_lr_other_than_auto_is_refused_when_the_config_is_built() -> None:
    # lr is `float | str`: the word passes coercion and the check names what it accepts.
    with pytest.raises(SAELensError, match="lr must be positive or 'auto', got 'fast'"):
        Cfg.from_dict({"lr": "fast"})


def test_coerce_field_none_for_required_field() -> None:
    with pytest.raises(SAELensError, match="context_size"):
        coerce_field(Cfg, "context_size", "none")


def test_invalid_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1, 2\nk: : :\n")
    with pytest.raises(SAELensError, match="not valid YAML") as info:
        Cfg.from_yaml(path)
    assert "\n" not in str(info.value)

    path.write_text("- just\n- a list\n")
    with pytest.raises(SAELensError, match="mapping"):
        Cfg.from_yaml(path)
    with pytest.raises(SAELensError, match="does not exist"):
        Cfg.from_yaml(tmp_path / "missing.yaml")


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert Cfg.from_yaml(path) == Cfg()


def test_configuration_docs_cover_every_field() -> None:
    """docs/configuration.md is generated from the dataclass; it must not fall behind it."""
    from dataclasses import fields
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [f.name for f in fields(Cfg) if f"`{f.name}`" not in text]
    assert not missing, f"run `python docs/gen_configuration.py`; undocumented: {missing}"


# -- architecture options by their seed-era names -----------------------------------------------------


def test_architecture_options_given_by_name_go_to_sae_options() -> None:
    cfg = Cfg(k=16, l1_coefficient=0.01)
    assert cfg.sae_options["k"] == 16 and cfg.sae_options["l1_coefficient"] == 0.01
    assert cfg.k == 16 and cfg.l1_coefficient == 0.01
    assert "k" not in {f.name for f in dataclasses.fields(cfg)}
    # An option of another architecture is kept (and unused), but only the chosen one's reach its SAE.
    sae_cfg = cfg.sae_config(d_in=8)
    assert type(sae_cfg).__name__ == "TopKSAEConfig" and sae_cfg.k == 16
    assert not hasattr(sae_cfg, "l1_coefficient")


def test_sae_options_hold_the_chosen_architectures_defaults() -> None:
    topk = Cfg().sae_options
    assert {"k": 32, "aux_k": None, "aux_k_coefficient": 8.0}.items() <= topk.items()
    assert "l1_coefficient" not in topk
    standard = Cfg(architecture="standard").sae_options
    assert {"l1_coefficient": 1e-3, "lp_norm": 1.0, "use_ghost_grads": False}.items() <= standard.items()
    assert "k" not in standard
    # However an equal config is written, it compares equal.
    assert Cfg(architecture="topk") == Cfg(architecture="topk", k=32) == Cfg(sae_options={"k": 32})


def test_an_option_can_be_set_as_an_attribute() -> None:
    cfg = Cfg(d_in=16)
    cfg.k = 8
    assert cfg.k == 8 and cfg.sae_options["k"] == 8
    assert cfg.sae_config().k == 8
    cfg.jumprelu_bandwidth = 0.5  # any architecture's option, stored for when it is chosen
    assert cfg.sae_options["jumprelu_bandwidth"] == 0.5
    with pytest.raises(AttributeError, match="no_such_option"):
        _ = cfg.no_such_option


def test_architecture_options_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("architecture: jumprelu\nl1_coefficient: 0.01\njumprelu_bandwidth: '0.05'\nk: 16\n")
    cfg = Cfg.from_yaml(path)
    assert cfg.sae_options["l1_coefficient"] == 0.01 and cfg.sae_options["jumprelu_bandwidth"] == 0.05
    assert cfg.sae_options["k"] == 16  # not a jumprelu option: kept, not used
    assert not hasattr(cfg.sae_config(d_in=8), "k")
    # Written back flat, the way it was read.
    cfg.to_yaml(tmp_path / "out.yaml")
    written = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert written["jumprelu_bandwidth"] == 0.05 and written["k"] == 16 and "sae_options" not in written
    assert Cfg.from_yaml(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("jumprelu_bandwith", "jumprelu_bandwidth"), ("topk_threshold", "topk_threshold_lr"), ("auxk", "aux_k")],
)
def test_unknown_key_suggests_the_closest_architecture_option(key: str, suggestion: str) -> None:
    with pytest.raises(SAELensError, match=f"did you mean '{suggestion}'"):
        Cfg(**{key: 1})
    with pytest.raises(SAELensError, match=f"did you mean '{suggestion}'"):
        Cfg.from_dict({key: 1})
    with pytest.raises(SAELensError, match=f"did you mean '{suggestion}'"):
        Cfg(sae_options={key: 1})


def test_options_are_checked_at_construction_by_their_architecture() -> None:
    with pytest.raises(SAELensError, match="jumprelu_bandwidth"):
        Cfg(architecture="topk", jumprelu_bandwidth=-1.0)
    with pytest.raises(SAELensError, match="jumprelu_sparsity_loss_mode"):
        Cfg(architecture="jumprelu", jumprelu_sparsity_loss_mode="l2")


def test_cross_field_checks_run_once_the_shape_is_known() -> None:
    # Without d_in or d_sae, k cannot be compared with d_sae yet.
    assert Cfg(k=10_000).k == 10_000
    with pytest.raises(SAELensError, match="k"):
        Cfg(d_in=4, expansion_factor=2, k=16)
    with pytest.raises(SAELensError, match="matryoshka_widths"):
        Cfg(architecture="matryoshka_batchtopk", d_sae=64, k=4, matryoshka_widths=[16, 32])
    assert Cfg(architecture="matryoshka_batchtopk", d_sae=64, k=4, matryoshka_widths=[16, 64]).d_sae == 64


def test_sae_config_carries_the_shape_and_where_the_sae_belongs() -> None:
    cfg = Cfg(
        architecture="standard",
        hook_point="blocks.2.attn.hook_z",
        hook_point_head_index=3,
        expansion_factor=4,
        dtype="float64",
        l1_coefficient=0.2,
    )
    sae_cfg = cfg.sae_config(d_in=16)
    assert (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.dtype, sae_cfg.l1_coefficient) == (16, 64, "float64", 0.2)
    assert sae_cfg.metadata["hook_name"] == "blocks.2.attn.hook_z"
    assert sae_cfg.metadata["hook_layer"] == 2 and sae_cfg.metadata["hook_head_index"] == 3
    assert sae_cfg.metadata["model_name"] == cfg.model_name
    with pytest.raises(SAELensError, match="d_in"):
        cfg.sae_config()


def test_the_runner_config_is_a_trainer_config() -> None:
    from sae_lens.training.config import TrainerConfig

    assert issubclass(Cfg, TrainerConfig)
    trainer_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert trainer_fields <= {f.name for f in dataclasses.fields(Cfg)}
