"""Write the dictionary_learning reference folders in this directory, using the real library.

Run ONLY with the side environment's interpreter, from outside this repository:

    REPO=$PWD; cd /tmp && env -u PYTHONPATH HF_HUB_OFFLINE=1 WANDB_MODE=disabled \
        /tmp/venv-dictlearn/bin/python "$REPO/tests/data/dictionary_learning/generate.py"

Each folder is what the library's own training entry point `dictionary_learning.training.trainSAE`
writes for one trainer (`config.json` and `ae.pt`, moved up from its `trainer_0/` sub-folder), after
a few hundred real training steps on seeded synthetic activations (d_in 16, dict_size 64): sparse
combinations of a hidden dictionary plus an offset and noise, so biases, thresholds and decoder
norms all move away from their initial values. Nothing in the saved files is edited by hand.

`expected.safetensors` then holds a fixed input `x` [8, 16] and the outputs of the dictionary
loaded back with the library's own `dictionary_learning.utils.load_dictionary` (the class's
`from_pretrained` where `load_dictionary` cannot load the folder: see AutoEncoderNew).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
EXPECTED_VERSION = "0.1.0"


def _refuse(message: str) -> None:
    print(f"generate.py: {message}", file=sys.stderr)
    raise SystemExit(2)


try:
    import dictionary_learning
except ImportError as error:
    _refuse(f"cannot import dictionary_learning ({error}); run it with /tmp/venv-dictlearn/bin/python")

_location = Path(dictionary_learning.__file__).resolve()
if dictionary_learning.__version__ != EXPECTED_VERSION or _location.is_relative_to(REPO_ROOT):
    _refuse(
        f"imported dictionary_learning {dictionary_learning.__version__} from {_location}, not "
        f"dictionary-learning {EXPECTED_VERSION}; run it with /tmp/venv-dictlearn/bin/python from "
        "outside the repository"
    )

import torch  # noqa: E402  (only after the check: a wrong interpreter should fail on the line above)
from dictionary_learning.dictionary import (  # noqa: E402
    AutoEncoder,
    AutoEncoderNew,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
)
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.gdm import GatedSAETrainer  # noqa: E402
from dictionary_learning.trainers.jumprelu import JumpReluTrainer  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import (  # noqa: E402
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from dictionary_learning.trainers.standard import (  # noqa: E402
    StandardTrainer,
    StandardTrainerAprilUpdate,
)
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer  # noqa: E402
from dictionary_learning.training import get_norm_factor, trainSAE  # noqa: E402
from dictionary_learning.utils import load_dictionary  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

D_IN = 16
DICT_SIZE = 64
K = 4
N_INPUTS = 8
STEPS = 300
BATCH = 64
# The metadata the trainers require and record; names follow the library's demo convention
# (`resid_post_layer_{layer}` for the output of model.gpt_neox.layers[layer]).
LAYER = 3
LM_NAME = "EleutherAI/pythia-70m-deduped"
SUBMODULE_NAME = f"resid_post_layer_{LAYER}"

# The library's defaults (warmup 1000, sparsity warmup 2000, threshold start 1000, lr 7e-5 for
# JumpReLU, 5e-5 for gated) are sized for 10^4-10^5 steps: with 300 steps the warmups would fail
# its own asserts and the learned thresholds would never start. These shrink them to fit.
COMMON = {
    "steps": STEPS,
    "activation_dim": D_IN,
    "dict_size": DICT_SIZE,
    "layer": LAYER,
    "lm_name": LM_NAME,
    "submodule_name": SUBMODULE_NAME,
    "device": "cpu",
    "warmup_steps": 10,
}
TOPK_FAMILY = {"k": K, "threshold_start_step": 10}

# folder -> (trainer config for trainSAE, trainSAE keyword arguments)
TRAINERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "standard": (
        {"trainer": StandardTrainer, "lr": 1e-2, "l1_penalty": 0.1, "sparsity_warmup_steps": 10},
        {},
    ),
    "standard_april_update": (
        {"trainer": StandardTrainerAprilUpdate, "lr": 1e-2, "l1_penalty": 0.1, "sparsity_warmup_steps": 10},
        {},
    ),
    # AutoEncoderNew is the April-update architecture; no trainer uses it by default, so it goes
    # through the April-update trainer's dict_class argument (which still records "AutoEncoder").
    "autoencoder_new": (
        {
            "trainer": StandardTrainerAprilUpdate,
            "dict_class": AutoEncoderNew,
            "lr": 1e-2,
            "l1_penalty": 0.1,
            "sparsity_warmup_steps": 10,
        },
        {},
    ),
    "gated": (
        {"trainer": GatedSAETrainer, "lr": 1e-2, "l1_penalty": 0.1, "sparsity_warmup_steps": 10},
        {},
    ),
    "topk": ({"trainer": TopKTrainer, **TOPK_FAMILY}, {}),
    # The same trainer with trainSAE(normalize_activations=True): config gains norm_factor and the
    # saved biases (and threshold) are scaled back up so the file works on raw activations.
    "topk_normalized": ({"trainer": TopKTrainer, **TOPK_FAMILY}, {"normalize_activations": True}),
    "batch_topk": ({"trainer": BatchTopKTrainer, **TOPK_FAMILY}, {}),
    "matryoshka_batch_topk": (
        {"trainer": MatryoshkaBatchTopKTrainer, **TOPK_FAMILY, "group_fractions": [0.25, 0.25, 0.5]},
        {},
    ),
    "jumprelu": (
        {"trainer": JumpReluTrainer, "lr": 5e-3, "target_l0": 4.0, "sparsity_warmup_steps": 10},
        {},
    ),
}


def synthetic_activations(seed: int) -> Iterator[torch.Tensor]:
    """Endless [BATCH, D_IN] batches: 3-sparse codes over a hidden 48-atom dictionary, plus a fixed
    offset (so the learned decoder bias is far from zero) and a little noise. Norms are ~3, so
    normalize_activations has a factor well away from 1 to fold in."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(48, D_IN, generator=generator)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    offset = 1.5 * torch.randn(D_IN, generator=generator)
    while True:
        scores = torch.rand(BATCH, 48, generator=generator)
        chosen = scores.topk(3, dim=-1).indices
        magnitudes = 1.0 + torch.rand(BATCH, 3, generator=generator)
        codes = torch.zeros(BATCH, 48).scatter_(-1, chosen, magnitudes)
        yield codes @ atoms + offset + 0.05 * torch.randn(BATCH, D_IN, generator=generator)


def train(folder: Path, trainer_cfg: dict[str, Any], run_kwargs: dict[str, Any], seed: int) -> None:
    """One trainSAE run; its trainer_0/ output becomes `folder`."""
    scratch = folder.parent / f".{folder.name}.tmp"
    for path in (folder, scratch):
        if path.exists():
            shutil.rmtree(path)  # no stale files from an earlier run may survive beside the new ones
    # JumpReluTrainer never calls torch.manual_seed(seed) itself; seed the init for every trainer.
    torch.manual_seed(seed)
    trainSAE(
        data=synthetic_activations(seed),
        trainer_configs=[{**COMMON, **trainer_cfg, "seed": seed}],
        steps=STEPS,
        save_dir=str(scratch),
        device="cpu",
        **run_kwargs,
    )
    shutil.move(str(scratch / "trainer_0"), str(folder))
    scratch.rmdir()


@torch.no_grad()
def reference_outputs(folder: Path, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    """The library's encode / decode / forward (and intermediates) for the folder's dictionary.
    Also returns how it was loaded (with load_dictionary's error where that failed)."""
    ae_path = str(folder / "ae.pt")
    try:
        ae, _ = load_dictionary(str(folder), device="cpu")
        loader = "dictionary_learning.utils.load_dictionary"
    except RuntimeError as error:
        # config.json says "AutoEncoder" (the April trainer hard-codes it) but ae.pt holds an
        # AutoEncoderNew state dict, so load_dictionary's AutoEncoder.load_state_dict fails.
        ae = AutoEncoderNew.from_pretrained(ae_path, device="cpu")
        message = " ".join(str(error).split())
        loader = f"AutoEncoderNew.from_pretrained (load_dictionary raised: {message})"
    ae.eval()
    f = ae.encode(x)
    out = {"x": x, "encode": f, "decode": ae.decode(f), "forward": ae(x)}

    if type(ae) is AutoEncoder:
        out["pre_acts"] = ae.encoder(x - ae.bias)
        # load_dictionary -> AutoEncoder.from_pretrained(normalize_decoder=True) rescales the decoder
        # columns to unit norm and folds the norms into the encoder. Also record the weights as saved.
        raw = AutoEncoder.from_pretrained(ae_path, normalize_decoder=False)
        f_raw = raw.encode(x)
        out.update(
            encode_unnormalized=f_raw, decode_unnormalized=raw.decode(f_raw), forward_unnormalized=raw(x)
        )
    elif type(ae) is AutoEncoderNew:
        out["pre_acts"] = ae.encoder(x)
        out["forward_features"] = ae(x, output_features=True)[1]  # f scaled by decoder column norms
    elif type(ae) is GatedAutoEncoder:
        out["encoder_out"] = ae.encoder(x - ae.decoder_bias)  # shared by the gate and magnitude paths
        out["gate_relu"] = ae.encode(x, return_gate=True)[1]
    elif type(ae) is AutoEncoderTopK:
        _, top_values, top_indices, post_relu = ae.encode(x, return_topk=True)
        out.update(
            encode_top_values=top_values,
            encode_top_indices=top_indices,
            post_relu=post_relu,
            encode_threshold=ae.encode(x, use_threshold=True),
        )
    elif type(ae) in (BatchTopKSAE, MatryoshkaBatchTopKSAE):
        # encode() defaults to use_threshold=True (inference); use_threshold=False is the training
        # path: top (k * batch) over the whole flattened batch of 8.
        out["post_relu"] = ae.encode(x, return_active=True)[2]
        out["encode_batch_topk"] = ae.encode(x, use_threshold=False)
    elif type(ae) is JumpReluAutoEncoder:
        out["pre_jump"] = ae.encode(x, output_pre_jump=True)[1]
    return out, loader


def summary(folder: Path) -> dict[str, Any]:
    """Facts for the log: parameter ranges that show training left nothing trivial."""
    state = torch.load(folder / "ae.pt", weights_only=True)
    facts: dict[str, Any] = {"keys": {k: list(v.shape) for k, v in state.items()}}
    for name, value in state.items():
        if value.is_floating_point():
            facts[name] = f"{value.min().item():.4g}..{value.max().item():.4g}"
        else:
            facts[name] = value.tolist()
    return facts


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors; avoid spinning up a thread pool on a shared machine
    for index, (name, (trainer_cfg, run_kwargs)) in enumerate(TRAINERS.items()):
        folder = HERE / name
        seed = 4000 + index
        train(folder, trainer_cfg, run_kwargs, seed)
        # A held-out batch of the training distribution (trainSAE read at most STEPS + 102 batches).
        x = next(islice(synthetic_activations(seed), STEPS + 200, None))[:N_INPUTS].contiguous()
        expected, loader = reference_outputs(folder, x)
        config = json.loads((folder / "config.json").read_text())["trainer"]
        facts = {
            "dictionary_learning_version": dictionary_learning.__version__,
            "torch_version": torch.__version__,
            "dict_class": str(config["dict_class"]),
            "trainer_class": str(config["trainer_class"]),
            "loaded_with": loader,
        }
        if run_kwargs.get("normalize_activations"):
            # trainSAE puts norm_factor into a copy of trainer.config after config.json is written,
            # so the folder never records it. Recompute it the same way (same data, same function).
            facts["norm_factor_not_saved_by_library"] = repr(
                get_norm_factor(synthetic_activations(seed), steps=100)
            )
        save_file(
            {key: t.detach().contiguous() for key, t in expected.items()},
            folder / "expected.safetensors",
            facts,
        )
        active = (expected["encode"] != 0).sum(dim=-1).tolist()
        print(
            f"{name}: {facts['trainer_class']} -> {facts['dict_class']}, loaded with {loader}, "
            f"active per input {active}"
        )
        print(f"    {summary(folder)}")
    print(
        f"dictionary_learning {dictionary_learning.__version__}, torch {torch.__version__}, "
        f"python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
