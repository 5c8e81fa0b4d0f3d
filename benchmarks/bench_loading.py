"""Peak memory of loading a large SAE, against the size of its weights.

Run from the repository root with the venv active::

    python benchmarks/bench_loading.py                    # 2048 x 32768 float32: 512 MB of weights
    python benchmarks/bench_loading.py --d-in 2048 --d-sae 65536 --cases load_from_disk naive

It writes a synthetic SAE folder once (`cfg.json`, `sae_weights.safetensors`; a sparsify copy of
it for the transposed-format case), then loads it in a fresh subprocess per case and reports the
peak resident-memory increase over the process's memory just before the load (its VmHWM after,
reset just before, minus its RSS before; from /proc, so Linux only), as a multiple of the weights'
size. Cases:

- `load_from_disk`: `SparseAutoencoder.load_from_disk(folder)`, the file's dtype (float32);
- `from_pretrained`: `SparseAutoencoder.from_pretrained(folder)` (the same, through the resolver);
- `bfloat16`: `load_from_disk(folder, dtype="bfloat16")` (weights converted while loading; the
  ratio is against the float32 file);
- `sparsify`: the same weights as a sparsify folder, whose encoder is stored transposed (one
  tensor at a time is copied into our orientation);
- `naive`: what loading did before (build the SAE with random initialisation, then
  `load_state_dict(load_file(...))`), for comparison.

The target is a peak of at most 1.3x the weights for `load_from_disk` / `from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("load_from_disk", "from_pretrained", "bfloat16", "sparsify", "naive")

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from sae_lens.saes import SparseAutoencoder, SAEConfig

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

def peak_rss():
    # VmHWM, this process's own high-water mark. (ru_maxrss is not: after fork + exec it still
    # holds the parent's resident size at the fork, which here includes the weights it just wrote.)
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

case, folder, sparsify_folder = sys.argv[1], sys.argv[2], sys.argv[3]
# Warm up the code paths (imports, registries) on nothing big before measuring.
from sae_lens.sae_files import registered_formats
registered_formats()
import sae_lens.hub
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS: the peak measured is the load's
before = rss()
start = time.perf_counter()
if case == "load_from_disk":
    sae = SparseAutoencoder.load_from_disk(folder)
elif case == "from_pretrained":
    sae = SparseAutoencoder.from_pretrained(folder)
elif case == "bfloat16":
    sae = SparseAutoencoder.load_from_disk(folder, dtype="bfloat16")
elif case == "sparsify":
    sae = SparseAutoencoder.load_from_disk(sparsify_folder)
elif case == "naive":
    cfg = json.load(open(folder + "/cfg.json"))
    sae = SparseAutoencoder(SAEConfig.from_dict(cfg))
    sae.load_state_dict(load_file(folder + "/sae_weights.safetensors"))
seconds = time.perf_counter() - start
peak = peak_rss()
print(json.dumps({"case": case, "peak_increase": peak - before, "after_increase": rss() - before,
                  "seconds": seconds, "dtype": str(sae.W_enc.dtype)}))
"""


def write_folders(root: Path, d_in: int, d_sae: int) -> tuple[Path, Path, int]:
    """A SAELens-format TopK folder and a sparsify copy of the same weights; returns their paths
    and the weights' size in bytes."""
    import torch
    from safetensors.torch import save_file

    folder, sparsify = root / "sae", root / "sparsify" / "layers.3"
    folder.mkdir(parents=True, exist_ok=True)
    sparsify.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator),
        "b_enc": torch.randn(d_sae, generator=generator),
        "W_dec": torch.randn(d_sae, d_in, generator=generator),
        "b_dec": torch.randn(d_in, generator=generator),
    }
    size = sum(t.numel() * t.element_size() for t in weights.values())
    save_file(weights, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": 32, "dtype": "float32", "metadata": {}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    weights["encoder.weight"] = weights.pop("W_enc").T.contiguous()
    weights["encoder.bias"] = weights.pop("b_enc")
    save_file(weights, str(sparsify / "sae.safetensors"))
    (sparsify / "cfg.json").write_text(json.dumps({"num_latents": d_sae, "k": 32, "d_in": d_in}))
    return folder, sparsify, size


def run_case(case: str, folder: Path, sparsify: Path) -> dict:
    """One case in a fresh interpreter (so earlier cases' memory cannot hide its peak)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, case, str(folder), str(sparsify)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--dir", help="folder for the synthetic SAE (default: a temporary one, deleted after)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        start = time.perf_counter()
        folder, sparsify, size = write_folders(Path(scratch), args.d_in, args.d_sae)
        print(
            f"weights: {args.d_in} x {args.d_sae} float32, {size / 2**20:.0f} MiB (written in {time.perf_counter() - start:.1f} s)"
        )
        print(f"{'case':<16} {'peak increase':>14} {'x weights':>10} {'kept':>10} {'seconds':>8}  dtype")
        for case in args.cases:
            row = run_case(case, folder, sparsify)
            print(
                f"{case:<16} {row['peak_increase'] / 2**20:>10.0f} MiB {row['peak_increase'] / size:>10.2f} "
                f"{row['after_increase'] / 2**20:>6.0f} MiB {row['seconds']:>8.2f}  {row['dtype']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
