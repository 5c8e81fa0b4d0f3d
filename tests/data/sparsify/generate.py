"""Write the EleutherAI sparsify reference folders in this directory, using the real `eai-sparsify`.

Run ONLY with the side environment's interpreter, from outside this repository (so that nothing in
the checkout shadows the installed packages), and with the Hub switched off:

    REPO=$PWD; cd /tmp && env -u PYTHONPATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        SPARSIFY_DISABLE_TRITON=1 /tmp/venv-sparsify/bin/python \
        "$REPO/tests/data/sparsify/generate.py"      # started from the repository root

Two kinds of folders come out of it.

* Single sparse coders (`topk/`, `expansion_factor/`, `transcoder/`, `transcoder_skip/`,
  `groupmax/`, `multi_topk/`): each is a hub-style repository root holding one hookpoint folder
  (`layers.3/` or `layers.3.mlp/`) that sparsify's own `SparseCoder.save_to_disk` wrote, after this
  script filled the coder with seeded random, non-trivial parameters.
* Trainer run folders (`run_gpt2/`, `run_llama/`): sparsify's own `Trainer.fit` run for three
  steps on a tiny randomly initialised GPT-2 / Llama that this script builds and saves to a
  scratch folder, with a word-level tokenizer and a small text dataset built offline.
  `Trainer._checkpoint` wrote every file in them.

Every folder then gets `expected.safetensors`: a fixed input and the outputs of the coder that
sparsify's own `SparseCoder.load_from_disk` loads back from the folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
EXPECTED_VERSION = "1.3.3"


def _refuse(message: str) -> None:
    print(f"generate.py: {message}", file=sys.stderr)
    raise SystemExit(2)


try:
    import sparsify
except ImportError as error:
    _refuse(f"cannot import sparsify ({error}); run it with /tmp/venv-sparsify/bin/python")

_location = Path(sparsify.__file__).resolve()
if sparsify.__version__ != EXPECTED_VERSION or _location.is_relative_to(REPO_ROOT):
    _refuse(
        f"imported sparsify {sparsify.__version__} from {_location}, not eai-sparsify "
        f"{EXPECTED_VERSION}; run it with /tmp/venv-sparsify/bin/python from outside the repository"
    )

import torch  # noqa: E402  (only after the check: a wrong interpreter should fail on the line above)
from safetensors.torch import save_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

D_IN = 16
NUM_LATENTS = 64
K = 4
N_INPUTS = 8

# name -> (hookpoint folder, SparseCoderConfig fields). Everything not named keeps sparsify's default.
SINGLE_CODERS: dict[str, tuple[str, dict[str, Any]]] = {
    # Plain TopK SAE. normalize_decoder=False so that the non-unit decoder rows written below are
    # what sparsify itself would keep (with True its trainer renormalises them every step).
    "topk": ("layers.3", {"num_latents": NUM_LATENTS, "k": K, "normalize_decoder": False}),
    # num_latents 0: the width is d_in * expansion_factor = 16 * 4 = 64. Default normalize_decoder
    # (True), so the decoder rows are set to unit norm with sparsify's own method.
    "expansion_factor": ("layers.3", {"num_latents": 0, "expansion_factor": 4, "k": K}),
    "transcoder": ("layers.3.mlp", {"num_latents": NUM_LATENTS, "k": K, "transcode": True}),
    "transcoder_skip": (
        "layers.3.mlp",
        {"num_latents": NUM_LATENTS, "k": K, "transcode": True, "skip_connection": True},
    ),
    # GroupMax: k groups of num_latents // k consecutive latents, the max of each group is kept.
    "groupmax": (
        "layers.3",
        {"num_latents": NUM_LATENTS, "k": K, "activation": "groupmax", "normalize_decoder": False},
    ),
    "multi_topk": (
        "layers.3",
        {"num_latents": NUM_LATENTS, "k": K, "multi_topk": True, "normalize_decoder": False},
    ),
}

# Trainer runs: (model family, hookpoints as sparsify names them relative to model.base_model).
RUNS: dict[str, tuple[str, list[str]]] = {
    "run_gpt2": ("gpt2", ["h.0", "h.1.mlp"]),
    "run_llama": ("llama", ["layers.0", "layers.1.mlp"]),
}
RUN_STEPS = 3
RUN_BATCH_SEQUENCES = 4
RUN_CTX_LEN = 16
WORDS = [f"w{i}" for i in range(40)]
SCRATCH = Path("/tmp/sparsify-fixture-scratch")


@torch.no_grad()
def randomise(coder: SparseCoder, generator: torch.Generator) -> None:
    """Seeded parameters that exercise every term: untied encoder/decoder, non-zero biases,
    decoder rows of norms 0.5-2 (unit norm where the config asks sparsify to normalise), a dense
    W_skip. Transcoder-style encoders get a larger bias because nothing is subtracted first."""
    d_in, width = coder.d_in, coder.num_latents
    coder.encoder.weight.copy_(0.5 * torch.randn(width, d_in, generator=generator))
    coder.encoder.bias.copy_(0.3 * torch.randn(width, generator=generator))
    rows = torch.randn(width, d_in, generator=generator)
    norms = 0.5 + 1.5 * torch.rand(width, 1, generator=generator)
    assert coder.W_dec is not None
    coder.W_dec.copy_(rows / rows.norm(dim=-1, keepdim=True) * norms)
    if coder.cfg.normalize_decoder and not coder.cfg.transcode:
        coder.set_decoder_norm_to_unit_norm()  # the library's own renormalisation
    coder.b_dec.copy_(0.5 * torch.randn(d_in, generator=generator))
    if coder.W_skip is not None:
        coder.W_skip.copy_(0.2 * torch.randn(d_in, d_in, generator=generator))


@torch.no_grad()
def reference_outputs(coder: SparseCoder, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """sparsify's own encode / decode / forward on `x` (and target `y` for transcoders)."""
    top_acts, top_indices, pre_acts = coder.encode(x)
    # sparsify never builds the dense [batch, num_latents] code; scatter its own top-k into one.
    dense = torch.zeros_like(pre_acts).scatter_(-1, top_indices, top_acts)
    decoded = coder.decode(top_acts, top_indices)
    forward = coder(x) if y is None else coder(x, y)
    out = {
        "x": x,
        "encode_pre_acts": pre_acts,
        "encode_top_acts": top_acts,
        "encode_top_indices": top_indices,
        "latents_dense": dense,
        "decode": decoded,
        "forward_sae_out": forward.sae_out,
        "forward_latent_acts": forward.latent_acts,
        "forward_latent_indices": forward.latent_indices,
        "forward_fvu": forward.fvu,
        "forward_auxk_loss": forward.auxk_loss,
        "forward_multi_topk_fvu": forward.multi_topk_fvu,
    }
    if y is not None:
        out["y"] = y
    if coder.W_skip is not None:
        # forward adds x @ W_skip.mT to decode(top-k); the difference of the two library outputs.
        out["skip_term"] = forward.sae_out - decoded
    return out


def write_expected(
    folder: Path, coder: SparseCoder, hookpoint: str, seed: int, transcoder: bool
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N_INPUTS, coder.d_in, generator=generator)
    y = torch.randn(N_INPUTS, coder.d_in, generator=generator) if transcoder else None
    expected = reference_outputs(coder, x, y)
    facts = {
        "sparsify_version": sparsify.__version__,
        "torch_version": torch.__version__,
        "hookpoint": hookpoint,
        "num_latents": str(coder.num_latents),
        "k": str(coder.cfg.k),
    }
    save_file(
        {name: t.detach().contiguous() for name, t in expected.items()},
        folder / "expected.safetensors",
        facts,
    )
    dense = expected["latents_dense"]
    return {"active_per_input": (dense > 0).sum(dim=-1).tolist()}


def write_single(name: str, hookpoint: str, options: dict[str, Any], seed: int) -> str:
    folder = HERE / name
    if folder.exists():
        shutil.rmtree(folder)  # no stale files from an earlier run may survive beside the new ones
    torch.manual_seed(seed)  # sparsify's own initialisation, before randomise overwrites it
    coder = SparseCoder(D_IN, SparseCoderConfig(**options), device="cpu", dtype=torch.float32)
    randomise(coder, torch.Generator().manual_seed(seed))
    coder.save_to_disk(folder / hookpoint)

    loaded = SparseCoder.load_from_disk(folder / hookpoint)
    facts = write_expected(folder, loaded, hookpoint, seed + 500, transcoder=loaded.cfg.transcode)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return f"{name}: {files}, width {loaded.num_latents}, active per input {facts['active_per_input']}"


# ----------------------------------------------------------------------------------- trainer runs


def build_tiny_model(family: str, folder: Path) -> None:
    """Save a tiny randomly initialised HF model and a word-level tokenizer, as `from_pretrained`
    expects them, so sparsify's trainer can run without the Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<|endoftext|>", unk_token="[UNK]", model_max_length=64
    )
    torch.manual_seed(0)
    if family == "gpt2":
        config: Any = GPT2Config(
            vocab_size=len(vocab),
            n_positions=64,
            n_embd=D_IN,
            n_layer=2,
            n_head=2,
            n_inner=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        model: Any = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=D_IN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_text_dataset(folder: Path) -> None:
    """A small seeded text corpus in the tiny tokenizer's vocabulary, saved with `save_to_disk`."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(1)
    texts = []
    for _ in range(40):
        ids = torch.randint(
            len(WORDS), (int(torch.randint(8, 24, (1,), generator=generator)),), generator=generator
        )
        texts.append(" ".join(WORDS[i] for i in ids.tolist()))
    Dataset.from_dict({"text": texts}).save_to_disk(str(folder))


def run_trainer(name: str, family: str, hookpoints: list[str], scratch: Path) -> str:
    """sparsify's own training loop and checkpoint code, on CPU.

    `python -m sparsify` cannot be used as is: its `load_artifacts` hard-codes
    `device_map={"": f"cuda:{rank}"}`. So this does what `sparsify.__main__.run` does after that
    call, with the model and dataset loaded the same way (AutoModel for loss_fn 'fvu',
    chunk_and_tokenize, shuffle(shuffle_seed), with_format('torch')) but on CPU.
    """
    from datasets import Dataset
    from sparsify.__main__ import RunConfig
    from sparsify.data import chunk_and_tokenize
    from sparsify.trainer import Trainer
    from transformers import AutoModel, AutoTokenizer

    model_dir = scratch / f"tiny-{family}"
    data_dir = scratch / "tiny-text"
    build_tiny_model(family, model_dir)
    if not data_dir.exists():
        build_text_dataset(data_dir)

    save_dir = scratch / "checkpoints"
    args = RunConfig(
        sae=SparseCoderConfig(num_latents=NUM_LATENTS, k=K),
        model=str(model_dir),
        dataset=str(data_dir),
        ctx_len=RUN_CTX_LEN,
        hookpoints=list(hookpoints),
        batch_size=RUN_BATCH_SEQUENCES,
        log_to_wandb=False,
        run_name=name,
        save_dir=str(save_dir),
        data_preprocessing_num_proc=1,  # recorded in config.json; the default depends on the machine
        max_examples=RUN_STEPS * RUN_BATCH_SEQUENCES,
    )
    model = AutoModel.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = chunk_and_tokenize(
        Dataset.load_from_disk(args.dataset),
        tokenizer,
        max_seq_len=args.ctx_len,
        num_proc=args.data_preprocessing_num_proc,
        text_key=args.text_column,
    )
    dataset = dataset.shuffle(args.shuffle_seed).with_format("torch")
    if args.max_examples:  # as load_artifacts applies it
        dataset = dataset.select(range(args.max_examples))

    trainer = Trainer(args, dataset, model)
    trainer.fit()

    folder = HERE / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(save_dir / name, folder)
    lines = [f"{name}: {sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())}"]
    expected: dict[str, torch.Tensor] = {}
    for index, hookpoint in enumerate(args.hookpoints):
        loaded = SparseCoder.load_from_disk(folder / hookpoint)
        generator = torch.Generator().manual_seed(2000 + index)
        x = torch.randn(N_INPUTS, loaded.d_in, generator=generator)
        tensors = reference_outputs(loaded, x, None)
        expected.update({f"{hookpoint}/{key}": t.detach().contiguous() for key, t in tensors.items()})
        assert loaded.W_dec is not None
        lines.append(
            f"  {hookpoint}: d_in {loaded.d_in}, |b_dec| {loaded.b_dec.norm():.4f}, "
            f"|encoder.bias| {loaded.encoder.bias.norm():.4f}, "
            f"decoder row norms {loaded.W_dec.norm(dim=-1).min():.4f}-{loaded.W_dec.norm(dim=-1).max():.4f}"
        )
    # One file for the whole run: keys are "<hookpoint>/<tensor>".
    save_file(
        expected,
        folder / "expected.safetensors",
        {"sparsify_version": sparsify.__version__, "torch_version": torch.__version__},
    )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors; avoid spinning up a thread pool on a shared machine
    for index, (name, (hookpoint, options)) in enumerate(SINGLE_CODERS.items()):
        print(write_single(name, hookpoint, options, seed=3000 + index))
    # A fixed scratch path, not a random temporary one: the run's config.json records the model,
    # dataset and save_dir paths, and regenerating should reproduce it byte for byte.
    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    SCRATCH.mkdir(parents=True)
    try:
        for name, (family, hookpoints) in RUNS.items():
            print(run_trainer(name, family, hookpoints, SCRATCH))
    finally:
        shutil.rmtree(SCRATCH)
    print(f"sparsify {sparsify.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
