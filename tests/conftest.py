"""Shared session fixtures: an offline environment, the real all-MiniLM-L6-v2 bridge, and a tiny GPT-2.

The tiny GPT-2 (2 blocks, d_model 64) is trained for 100 steps on a small generated corpus with a
word-level tokenizer, so its next-token cross-entropy is far below uniform and the CE/KL evals that
splice an SAE into it measure something real. Everything runs offline on the CPU.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

# Torch's intra-op threads spin while they wait for each other; on a small, shared CPU that makes
# these small models several times slower than one thread. Override with SAE_LENS_TEST_THREADS.
TEST_THREADS = int(os.environ.get("SAE_LENS_TEST_THREADS", "1"))

TINY_GPT2_CONTEXT = 32
_ANIMALS = ("cat", "dog", "bird", "fox", "cow", "owl")
_VERBS = ("sat", "ran", "slept", "sang", "hid", "ate")
_PLACES = ("mat", "park", "tree", "barn", "river", "hill")
_COLOURS = ("red", "blue", "green", "old", "big")


def tiny_corpus_words(n_sentences: int, seed: int) -> list[str]:
    """Words of `n_sentences` template sentences ("the red cat sat on the mat ."), seeded."""
    rng = random.Random(seed)
    words: list[str] = []
    for _ in range(n_sentences):
        animal = rng.choice(_ANIMALS)
        words += ["the", rng.choice(_COLOURS), animal, rng.choice(_VERBS), "on", "the"]
        words += [rng.choice(_PLACES), "."]
    return words


def _tiny_vocab() -> list[str]:
    return ["<|endoftext|>", "<unk>", "the", "on", ".", *_ANIMALS, *_VERBS, *_PLACES, *_COLOURS]


def _tiny_tokenizer() -> Any:
    """A GPT-2-style word-level tokenizer: <|endoftext|> is BOS and EOS, as in GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_tiny_vocab())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=128,
    )


def tiny_rows(tokenizer: Any, n_rows: int, seed: int) -> torch.Tensor:
    """`[n_rows, TINY_GPT2_CONTEXT]` rows of the tiny corpus, each opening with BOS."""
    body = TINY_GPT2_CONTEXT - 1
    words = tiny_corpus_words(n_rows * body // 6 + 8, seed)
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id, *ids[i * body : (i + 1) * body]] for i in range(n_rows)]
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Offline hub/datasets/wandb, a throwaway SAE_LENS_CACHE and TEST_THREADS torch threads.

    Yields the variables set, so subprocess tests can pass the same environment on.
    """
    root = tmp_path_factory.mktemp("session_env")
    values = {
        **OFFLINE_ENV,
        "SAE_LENS_CACHE": str(root / "sae_lens_cache"),
        "HF_DATASETS_CACHE": str(root / "hf_datasets_cache"),
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
        "OMP_NUM_THREADS": str(TEST_THREADS),
        "TOKENIZERS_PARALLELISM": "false",
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        # These libraries read the variables when first imported, which may already have happened.
        import datasets
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets_cache")
        try:
            yield values
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm(offline_env: dict[str, str]) -> Any:
    """The real all-MiniLM-L6-v2 as a TransformerBridge, loaded once per session."""
    from sae_lens.models import load_model

    return load_model("sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny trained GPT2LMHeadModel and its tokenizer (`save_pretrained`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = _tiny_tokenizer()
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    rows = tiny_rows(tokenizer, 256, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        batch = rows[torch.randint(0, rows.shape[0], (16,), generator=generator)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # The corpus has ~1.6 bits of choice per word; uniform over the vocab is log(V) nats.
    assert loss.item() < 0.5 * math.log(len(tokenizer)), loss.item()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir: Path) -> Any:
    """The tiny GPT-2 loaded through `sae_lens.models.load_model` from its folder."""
    from sae_lens.models import load_model

    return load_model(str(tiny_gpt2_dir))


@pytest.fixture(scope="session")
def tiny_corpus_text() -> str:
    """Text of the tiny GPT-2's corpus (a seed unused in training): paragraphs of 20 sentences."""
    words = tiny_corpus_words(400, seed=2)
    return "\n\n".join(" ".join(words[i : i + 160]) for i in range(0, len(words), 160))


@pytest.fixture(scope="session")
def tiny_gpt2_tokens(tiny_gpt2: Any) -> torch.Tensor:
    """16 held-out rows of the tiny corpus (a different seed than training), `[16, 32]`."""
    return tiny_rows(tiny_gpt2.tokenizer, 16, seed=1)


def make_sae_config(architecture: str = "standard", d_in: int = 8, d_sae: int = 32, **options: Any) -> Any:
    """The config of `architecture` (its own `SAEConfig` subclass) with the given shape and options.

    Every test builds SAE configs through here, so a change in how configs are built is one edit.
    """
    from sae_lens.saes import get_architecture_class

    return get_architecture_class(architecture).config_class(d_in=d_in, d_sae=d_sae, **options)


def make_runner_config(**values: Any) -> Any:
    """A `LanguageModelSAERunnerConfig` from field values (architecture options included)."""
    from sae_lens.config import LanguageModelSAERunnerConfig

    return LanguageModelSAERunnerConfig(**values)


@pytest.fixture
def sae_config_factory() -> Any:
    """`make_sae_config` as a fixture."""
    return make_sae_config


@pytest.fixture
def runner_config_factory() -> Any:
    """`make_runner_config` as a fixture."""
    return make_runner_config


def _sparse_data(n: int, seed: int, d: int = 16, n_dirs: int = 32, p: float = 3 / 32) -> torch.Tensor:
    """Sparse non-negative combinations of 32 fixed random unit directions in 16 dimensions."""
    dirs = torch.randn(n_dirs, d, generator=torch.Generator().manual_seed(0))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(n, n_dirs, generator=gen) < p
    return (active * (torch.rand(n, n_dirs, generator=gen) + 0.5)) @ dirs


def _train_on_sparse_data(
    cfg: Any, steps: int = 300, batch: int = 256
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Build the SAE `cfg` names (seed 0), train it `steps` steps on `_sparse_data`, and return
    `(sae, before, after)` with held-out explained variance and L0 before and after training."""
    from sae_lens import SAETrainer, SparseAutoencoder
    from sae_lens.evals import explained_variance

    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg)
    held_out = _sparse_data(2048, seed=10_000)

    def measure() -> dict[str, float]:
        with torch.no_grad():
            return {
                "ev": explained_variance(held_out, sae(held_out)),
                "l0": (sae.encode(held_out) != 0).sum(-1).float().mean().item(),
            }

    before = measure()
    trainer = SAETrainer(cfg, sae, show_progress=False)
    trainer.fit(_sparse_data(batch, seed=step) for step in range(steps))
    assert trainer.n_steps == steps
    return sae, before, measure()


@pytest.fixture
def train_on_sparse_data() -> Any:
    """`train_on_sparse_data(cfg) -> (sae, before, after)`; see `_train_on_sparse_data`."""
    return _train_on_sparse_data
