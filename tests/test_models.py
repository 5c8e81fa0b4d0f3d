"""sae_lens.models on real models: the embedded all-MiniLM-L6-v2 and a tiny trained GPT-2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens.activations_store import ActivationsStore
from sae_lens.errors import SAELensError
from sae_lens.models import hook_layer_of, is_causal_lm, load_model, validate_hook_point


def test_minilm_alias_loads_a_six_block_bridge(minilm: Any) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(minilm, TransformerBridge)
    assert minilm.cfg.n_layers == 6
    assert minilm.cfg.d_model == 384
    assert len(minilm.blocks) == 6
    assert minilm.tokenizer.cls_token_id == 101


def test_tiny_gpt2_loads_from_its_folder(tiny_gpt2: Any, tiny_gpt2_dir: Path) -> None:
    assert (tiny_gpt2_dir / "config.json").is_file()
    assert tiny_gpt2.cfg.n_layers == 2
    assert tiny_gpt2.cfg.d_model == 64
    tokens = torch.tensor([[tiny_gpt2.tokenizer.bos_token_id, 2, 10, 3, 2]])
    logits = tiny_gpt2(tokens)
    assert logits.shape == (1, 5, len(tiny_gpt2.tokenizer))


def test_is_causal_lm(minilm: Any, tiny_gpt2: Any) -> None:
    assert is_causal_lm(tiny_gpt2) is True
    assert is_causal_lm(minilm) is False


def test_validate_hook_point_names_valid_hooks(minilm: Any) -> None:
    validate_hook_point(minilm, "blocks.3.hook_resid_post")  # a valid name passes silently
    with pytest.raises(SAELensError) as info:
        validate_hook_point(minilm, "blocks.9.hook_resid_post")
    message = str(info.value)
    assert "blocks.9.hook_resid_post" in message
    assert "6 blocks" in message
    assert "blocks.0-5.hook_resid_" in message
    assert "blocks.5.hook_resid_post" in message  # a close valid name is suggested
    assert "\n" not in message


def test_missing_local_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(SAELensError, match="does not exist"):
        load_model(str(missing))


def test_hook_layer_of() -> None:
    assert hook_layer_of("blocks.4.hook_resid_post") == 4
    assert hook_layer_of("blocks.12.attn.hook_z") == 12
    assert hook_layer_of("embed.hook_out") is None


def _store(model: Any, hook_point: str, hook_layer: int) -> ActivationsStore:
    return ActivationsStore(
        model,
        [{"text": "unused"}],
        hook_point=hook_point,
        hook_layer=hook_layer,
        context_size=8,
        train_batch_size=8,
    )


@pytest.mark.parametrize(("model_name", "hook_layer"), [("minilm", 1), ("tiny_gpt2", 0)])
def test_get_activations_stops_after_the_hooked_block(
    model_name: str, hook_layer: int, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(model_name)
    hook_point = f"blocks.{hook_layer}.hook_resid_post"
    store = _store(model, hook_point, hook_layer)
    ran: list[int] = []
    handles = [
        block.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
        for index, block in enumerate(model.blocks)
    ]
    start = store.start_token_id
    tokens = torch.tensor([[start, 2000, 2001, 2002, 2003, 2004, 2005, 2006]]) % len(model.tokenizer)
    tokens[:, 0] = start
    try:
        acts = store.get_activations(tokens)
        assert sorted(set(ran)) == list(range(hook_layer + 1))  # later blocks never ran
        ran.clear()
        _, cache = model.run_with_cache(tokens)
        assert sorted(set(ran)) == list(range(model.cfg.n_layers))  # the hooks do see a full pass
    finally:
        for handle in handles:
            handle.remove()
    assert acts.shape == (1, 8, model.cfg.d_model)
    torch.testing.assert_close(acts, cache[hook_point], rtol=0, atol=0)
