"""Shared pieces of the kernel tests: random SAE problems and their gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

PARAM_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")

Problem = dict[str, torch.Tensor]


def random_problem(
    B: int,
    d_in: int,
    d_sae: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    b_enc_shift: float = 0.0,
    device: str = "cpu",
) -> Problem:
    """Leaf tensors x [B, d_in], W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
    b_dec [d_in], all requiring grad; b_enc shifted by `b_enc_shift`."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int, add: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dtype) + add).to(device).requires_grad_()

    return {
        "x": leaf(B, d_in),
        "W_enc": leaf(d_in, d_sae),
        "b_enc": leaf(d_sae, add=b_enc_shift),
        "W_dec": leaf(d_sae, d_in),
        "b_dec": leaf(d_in),
    }


def problem_grads(out: torch.Tensor, p: Problem, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of `<out, grad_out>` w.r.t. x, W_enc, b_enc, W_dec, b_dec, in that order."""
    return torch.autograd.grad(out, [p[n] for n in PARAM_NAMES], grad_out)


@pytest.fixture
def make_problem() -> Callable[..., Problem]:
    """`random_problem(B, d_in, d_sae, dtype=float64, seed=0, b_enc_shift=0.0, device="cpu")`."""
    return random_problem


@pytest.fixture
def grads() -> Callable[[torch.Tensor, Problem, torch.Tensor], tuple[torch.Tensor, ...]]:
    """`problem_grads(out, problem, grad_out)`: gradients w.r.t. x, W_enc, b_enc, W_dec, b_dec."""
    return problem_grads
