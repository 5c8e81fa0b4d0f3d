"""Micro-benchmark: dense vs sparse TopK (and BatchTopK) SAE forward+backward.

Run from the repository root::

    python benchmarks/bench_sparse_topk.py
    python benchmarks/bench_sparse_topk.py --device cuda --batch 16384
    python benchmarks/bench_sparse_topk.py --modes sparse,sparse_batchtopk --backend index --prefilter off

It times one training step's forward+backward (median, and min, over
``--runs`` interleaved rounds after ``--warmup`` iterations) of

* ``dense``: the reference TopK path (``addmm`` -> ``topk`` -> ReLU -> scatter
  into a dense ``[B, d_sae]`` matrix -> dense decode matmul), autograd backward;
* ``sparse``: :func:`sae_lens.kernels.sparse_topk_encode` +
  :func:`sae_lens.kernels.sparse_decode` (``--backend``, ``--prefilter`` pass through);
* ``sparse_batchtopk``: :func:`sae_lens.kernels.sparse_batchtopk_encode` +
  :func:`sae_lens.kernels.sparse_decode`;
* ``enc_matmul``: the bare forward matmul ``x @ W_enc`` alone, the lower bound
  for any TopK SAE step since its output has to be ranked;
* ``enc_matmul_out``: the same into a preallocated buffer, i.e. without the
  cost of allocating (and, on CPU, page-faulting) a fresh ``[B, d_sae]``
  output;

and reports the peak extra memory of one step of each, measured in a fresh
subprocess (sampled RSS on CPU, ``max_memory_allocated`` on CUDA).
The loss is the summed squared reconstruction error, and ``b_dec`` is a
parameter, so the sparse path also computes the gradient through
``sae_in = x - b_dec``.

On a shared machine, other processes' load inflates the medians a lot (each
OpenMP region waits for its descheduled thread); the min of the rounds is
then the better estimate of the uncontended cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Allow running as a script from the repo root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_lens.kernels import sparse_batchtopk_encode, sparse_decode, sparse_topk_encode

MODES = ("dense", "sparse", "sparse_batchtopk", "enc_matmul", "enc_matmul_out")
PREFILTER = {"auto": None, "on": True, "off": False}


def make_problem(
    batch: int, d_in: int, d_sae: int, device: str, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random SAE parameters and a batch ``x [batch, d_in]``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    W_enc = randn(d_in, d_sae, scale=d_in**-0.5)
    return {
        "x": randn(batch, d_in),
        "W_enc": W_enc.requires_grad_(),
        "b_enc": randn(d_sae, scale=0.01).requires_grad_(),
        # Tied init, as TopK SAEs usually start; a contiguous copy.
        "W_dec": W_enc.detach().T.contiguous().requires_grad_(),
        "b_dec": randn(d_in, scale=0.01).requires_grad_(),
    }


def step_fn(
    mode: str, p: dict[str, torch.Tensor], k: int, backend: str = "auto", prefilter: bool | None = None
) -> Callable[[], None]:
    """A closure running one forward+backward (or forward only for enc_matmul)."""
    params = [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]]
    x = p["x"]

    def zero_grads() -> None:
        for q in params:
            q.grad = None

    if mode == "dense":

        def dense() -> None:
            zero_grads()
            pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"])
            vals, idx = pre.topk(k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
            x_hat = acts @ p["W_dec"] + p["b_dec"]
            (x_hat - x).pow(2).sum().backward()

        return dense
    if mode == "sparse":

        def sparse() -> None:
            zero_grads()
            latents = sparse_topk_encode(
                x - p["b_dec"], p["W_enc"], p["b_enc"], k, backend=backend, prefilter=prefilter
            )
            x_hat = sparse_decode(latents, p["W_dec"], p["b_dec"], backend=backend)
            (x_hat - x).pow(2).sum().backward()

        return sparse
    if mode == "sparse_batchtopk":

        def sparse_batchtopk() -> None:
            zero_grads()
            latents = sparse_batchtopk_encode(x - p["b_dec"], p["W_enc"], p["b_enc"], k, backend=backend)
            x_hat = sparse_decode(latents, p["W_dec"], p["b_dec"], backend=backend)
            (x_hat - x).pow(2).sum().backward()

        return sparse_batchtopk
    if mode == "enc_matmul":
        W_enc = p["W_enc"].detach()

        def enc_matmul() -> None:
            x @ W_enc

        return enc_matmul
    if mode == "enc_matmul_out":
        W_enc = p["W_enc"].detach()
        out = torch.empty(x.shape[0], W_enc.shape[1], dtype=x.dtype, device=x.device)

        def enc_matmul_out() -> None:
            torch.mm(x, W_enc, out=out)

        return enc_matmul_out
    raise ValueError(mode)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], None]], runs: int, warmup: int, device: str
) -> dict[str, tuple[float, float]]:
    """(median, min) wall time in ms of each closure.

    The closures are run round-robin rather than one after the other, so a
    burst of load from other processes on a shared machine hits all of them
    alike instead of skewing one.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts) * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_memory(args: argparse.Namespace, mode: str) -> float:
    """Peak extra memory (MiB) of one step, in this process; call in a fresh one.

    On CPU a thread samples the RSS while the step runs (torch releases the
    GIL inside its kernels); the parent starts this process with a fixed
    glibc mmap threshold so that large tensors are returned to the OS when
    freed and the RSS tracks live tensors. Short-lived peaks between two
    samples can be missed, so the CPU figure is a lower bound.
    """
    p = make_problem(args.batch, args.d_in, args.d_sae, args.device, DTYPES[args.dtype])
    fn = step_fn(mode, p, args.k, args.backend, PREFILTER[args.prefilter])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak, _rss_bytes()) - base) / 2**20


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--backend", default="auto", choices=["auto", "csr", "index"])
    parser.add_argument("--prefilter", default="auto", choices=sorted(PREFILTER))
    parser.add_argument("--no-memory", action="store_true", help="skip memory runs")
    parser.add_argument("--_memory-of", dest="memory_of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_of:
        print(json.dumps({"mib": measure_memory(args, args.memory_of)}))
        return

    modes = [m for m in args.modes.split(",") if m]
    print(
        f"batch={args.batch} d_in={args.d_in} d_sae={args.d_sae} k={args.k} "
        f"dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} "
        f"backend={args.backend} prefilter={args.prefilter} torch={torch.__version__}"
    )
    p = make_problem(args.batch, args.d_in, args.d_sae, args.device, DTYPES[args.dtype])
    results = time_interleaved(
        {mode: step_fn(mode, p, args.k, args.backend, PREFILTER[args.prefilter]) for mode in modes},
        args.runs,
        args.warmup,
        args.device,
    )
    del p

    memory: dict[str, float] = {}
    if not args.no_memory:
        for mode in modes:
            # A fresh process per mode, so one mode's high-water mark does not
            # hide another's.
            cmd = [sys.executable, __file__, "--_memory-of", mode] + [
                a for a in sys.argv[1:] if a != "--no-memory"
            ]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            memory[mode] = json.loads(res.stdout.strip().splitlines()[-1])["mib"]

    label = {
        "dense": "dense fwd+bwd",
        "sparse": "sparse fwd+bwd",
        "sparse_batchtopk": "batchtopk fwd+bwd",
        "enc_matmul": "x @ W_enc fwd only",
        "enc_matmul_out": "mm(x, W_enc, out=buf)",
    }
    for mode in modes:
        ms, ms_min = results[mode]
        mem = f"  peak +{memory[mode]:8.1f} MiB" if mode in memory else ""
        print(
            f"{label[mode]:>22}: median {ms:9.1f} ms (min {ms_min:9.1f})"
            f"  {args.batch / ms * 1e3:12,.0f} tok/s{mem}"
        )
    if "dense" in results and "sparse" in results:
        print(f"speedup sparse vs dense (medians): {results['dense'][0] / results['sparse'][0]:.2f}x")
    if "sparse" in results and "enc_matmul" in results:
        print(
            f"sparse step / encoder matmul (medians): {results['sparse'][0] / results['enc_matmul'][0]:.2f}x"
        )


if __name__ == "__main__":
    main()
