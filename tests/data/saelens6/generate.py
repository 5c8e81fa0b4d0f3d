"""Write the SAELens 6.x reference folders in this directory, using the real `sae-lens` package.

Run ONLY with the reference library's interpreter, from outside this repository (our package is also
called `sae_lens`, and whichever comes first on sys.path wins):

    REPO=$PWD; cd /tmp && env -u PYTHONPATH PYTHONHASHSEED=0 /tmp/ref-venv/bin/python \
        "$REPO/tests/data/saelens6/generate.py"        # started from the repository root

(PYTHONHASHSEED only fixes the key order of cfg.json, which the reference builds from a set.)

For each architecture it builds the reference's own training SAE (class and config from its
training registry, via `TrainingSAE.get_sae_class_for_architecture`) with seeded random,
non-trivial parameters, writes the inference folder with the reference's
`TrainingSAE.save_inference_model` (what its training runner writes at the end of a run), loads
that folder back with the reference's `SAE.load_from_disk`, and stores a fixed input and the
reference's encode / decode / forward outputs in `<architecture>/expected.safetensors`.
tests/test_saelens6_reference_folders.py then checks that our library reproduces them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]

D_IN = 8
D_SAE = 32
K = 4
MATRYOSHKA_WIDTHS = [8, 16, 32]
N_INPUTS = 10
ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk")
# BatchTopK's inference threshold is an EMA of the smallest kept activation, starting at 0. At the
# reference's default rate (0.01) a handful of steps leaves it near 0, i.e. almost plain ReLU, which
# would not test the threshold at all; 0.5 lets five steps bring it close to a real value.
THRESHOLD_LR = 0.5
TRAINING_STEPS = 5


def _refuse(message: str) -> None:
    print(f"generate.py: {message}", file=sys.stderr)
    raise SystemExit(2)


try:
    import sae_lens
except ImportError as error:
    _refuse(f"cannot import the reference sae_lens ({error}); run it with /tmp/ref-venv/bin/python")

_version = str(getattr(sae_lens, "__version__", ""))
_location = Path(sae_lens.__file__).resolve()
if not _version.startswith("6.") or _location.is_relative_to(REPO_ROOT):
    _refuse(
        f"imported sae_lens {_version or '?'} from {_location}, not the reference sae-lens 6.x; "
        "run it with /tmp/ref-venv/bin/python from outside the repository, without PYTHONPATH"
    )

import torch  # noqa: E402  (only after the check: a wrong interpreter should fail on the line above)
from safetensors.torch import save_file  # noqa: E402

from sae_lens import SAE  # noqa: E402
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainStepInput  # noqa: E402

METADATA = {
    "model_name": "tiny-reference-model",
    "hook_name": "blocks.0.hook_resid_post",
    "context_size": 16,
    "prepend_bos": True,
}


def architecture_options(architecture: str) -> dict[str, Any]:
    """Training-config fields beyond d_in/d_sae; everything else keeps the reference default."""
    if architecture == "topk":
        return {"k": K}
    if architecture == "batchtopk":
        return {"k": float(K), "topk_threshold_lr": THRESHOLD_LR}
    if architecture == "matryoshka_batchtopk":
        return {"k": float(K), "topk_threshold_lr": THRESHOLD_LR, "matryoshka_widths": MATRYOSHKA_WIDTHS}
    return {}


@torch.no_grad()
def randomise(sae: TrainingSAE[Any], generator: torch.Generator) -> None:
    """Seeded parameters that exercise every term: non-zero biases, decoder rows of norms 0.5-2,
    JumpReLU thresholds spread over (0.05, 0.6), non-zero gated r_mag."""
    for name, param in sae.named_parameters():
        shape = param.shape
        if name == "W_dec":
            rows = torch.randn(shape, generator=generator)
            norms = 0.5 + 1.5 * torch.rand(shape[0], 1, generator=generator)
            value = rows / rows.norm(dim=-1, keepdim=True) * norms
        elif name == "W_enc":
            value = 0.5 * torch.randn(shape, generator=generator)
        elif name == "threshold":
            value = 0.05 + 0.55 * torch.rand(shape, generator=generator)
        elif name == "b_dec":
            value = 0.5 * torch.randn(shape, generator=generator)
        elif name in ("b_enc", "b_gate", "b_mag", "r_mag"):
            value = 0.3 * torch.randn(shape, generator=generator)
        else:
            raise RuntimeError(f"unexpected parameter {name!r}; update randomise() for it")
        param.copy_(value.to(param.dtype))


def train_briefly(sae: TrainingSAE[Any], generator: torch.Generator) -> None:
    """A few genuine reference training steps, so BatchTopK's threshold state comes from training."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for step in range(TRAINING_STEPS):
        batch = torch.randn(16, D_IN, generator=generator)
        step_input = TrainStepInput(
            sae_in=batch,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=step,
            is_logging_step=False,
        )
        optimizer.zero_grad()
        sae.training_forward_pass(step_input).loss.backward()
        optimizer.step()


def write_reference_folder(architecture: str, seed: int) -> dict[str, Any]:
    """Save one reference SAE folder and its expected outputs; returns facts for the README/log."""
    folder = HERE / architecture
    if folder.exists():
        shutil.rmtree(folder)  # no stale files from an earlier run may survive beside the new ones

    torch.manual_seed(seed)  # the reference's own initialisation, before randomise overwrites it
    generator = torch.Generator().manual_seed(seed)
    # The reference's training registry, through its own lookups (what its runner uses).
    sae_class = TrainingSAE.get_sae_class_for_architecture(architecture)
    cfg_class = TrainingSAE.get_sae_config_class_for_architecture(architecture)
    cfg = cfg_class(
        d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**METADATA), **architecture_options(architecture)
    )
    training_sae = sae_class(cfg)
    randomise(training_sae, generator)
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        train_briefly(training_sae, generator)
    training_sae.save_inference_model(folder)

    inference_sae = SAE.load_from_disk(folder)
    x = torch.randn(N_INPUTS, D_IN, generator=generator, dtype=torch.float32)
    with torch.no_grad():
        latents = inference_sae.encode(x)
        expected = {
            "x": x,
            "encode": latents,
            "decode": inference_sae.decode(latents),
            "forward": inference_sae(x),
        }
    facts = {
        "sae_lens_version": sae_lens.__version__,
        "torch_version": torch.__version__,
        "training_architecture": architecture,
        "saved_architecture": inference_sae.cfg.architecture(),
        "reference_class": type(inference_sae).__name__,
    }
    save_file(
        {name: t.detach().contiguous() for name, t in expected.items()},
        folder / "expected.safetensors",
        facts,
    )
    facts["files"] = sorted(p.name for p in folder.iterdir())
    facts["active_per_input"] = (latents > 0).sum(dim=-1).tolist()
    return facts


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors; avoid spinning up a thread pool on a shared machine
    for seed, architecture in enumerate(ARCHITECTURES):
        facts = write_reference_folder(architecture, seed=1000 + seed)
        print(
            f"{architecture}: saved as {facts['saved_architecture']} ({facts['reference_class']}), "
            f"files {facts['files']}, active latents per input {facts['active_per_input']}"
        )
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
