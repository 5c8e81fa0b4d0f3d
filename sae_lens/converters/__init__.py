"""Readers for other libraries' SAE files, one module per format; each registers itself with
`sae_lens.sae_files.register_format`, so adding a format is adding a file.

Every reader returns `SAEFiles` in our layout (a SAELens-6.x-shaped config and a state dict with our
names and orientation) and only builds data: none imports an SAE class. `sae_files` imports this
package the first time a folder is read.

| module | library | files |
|---|---|---|
| `sparsify` | EleutherAI sparsify | `cfg.json` + `sae.safetensors` per hookpoint |
| `dictionary_learning` | saprmarks/dictionary_learning | `ae.pt` + `config.json` (`trainer` section) |
| `gemma_scope` | Gemma Scope | `params.npz` |
| `gemma_scope_2` | Gemma Scope 2 | `config.json` + `params.safetensors` |
| `llama_scope` | Llama Scope (OpenMOSS Language-Model-SAEs) | `hyperparams.json` + `checkpoints/final.safetensors` |
| `connor_rob_hook_z` | attention-output (hook_z) SAEs | `<name>.pt` + `<name>_cfg.json` |
| `circuit_tracer` | circuit-tracer transcoder sets | `layer_N.safetensors` (+ `config.yaml`) |

SAELens' own format (what we write) is in `sae_lens.sae_files`.
"""

import importlib
import pkgutil

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
