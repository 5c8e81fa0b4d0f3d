"""Data parallelism on `torch.distributed`, as started by `torchrun --nproc_per_node N -m sae_lens train ...`.

Each rank streams its own shard of the documents and computes its own activations; after every
backward pass the SAE gradients are averaged across ranks, so every rank takes the same optimiser
step on the gradient of the global batch. The statistics that steer training are reduced too:
firing counts (summed), SAE buffers such as BatchTopK's threshold (averaged), the input-norm
estimate and the b_dec initialisation (computed on the first batches of all ranks). Only rank 0
logs, evaluates and saves. Without `torchrun` (WORLD_SIZE unset or 1) every function here is a
no-op, so the single-process path pays nothing.

Backends: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group `torchrun` describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process logs, evaluates and saves (rank 0)."""
    return rank() == 0


def local_device(device: str) -> str:
    """`cuda` becomes this rank's GPU under torchrun; other devices are unchanged."""
    if device == "cuda" and is_distributed():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shard_dataset(dataset: Any) -> Any:
    """This rank's share of the documents (every world_size-th row, starting at the rank)."""
    if not is_distributed():
        return dataset
    if hasattr(dataset, "shard") and hasattr(dataset, "__len__"):
        return dataset.shard(num_shards=world_size(), index=rank(), contiguous=False)
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, IterableDataset):
        return split_dataset_by_node(dataset, rank=rank(), world_size=world_size())
    return list(dataset)[rank() :: world_size()]


def average_gradients(module: torch.nn.Module) -> None:
    """Average every parameter's gradient across ranks, in one flat all-reduce."""
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def average_buffers(module: torch.nn.Module) -> None:
    """Average the module's floating-point buffers (BatchTopK's threshold) across ranks."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world_size()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` across ranks in place (returns it)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def mean_of(value: float) -> float:
    """The mean of a number across ranks."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def max_of(value: float) -> float:
    """The largest of a number across ranks (NaN wins, so a NaN loss anywhere stops every rank)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if tensor.isnan().any():
        tensor.fill_(float("inf"))
    flag = torch.tensor([1.0 if value != value else 0.0], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float("nan") if flag.item() else float(tensor.item())


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_ranks(flag: bool) -> bool:
    """Whether `flag` is true on every rank (a collective)."""
    return not any_rank(not flag)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along the first dimension, in rank order (equal shapes)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
