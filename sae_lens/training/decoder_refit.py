"""The decoder's closing least-squares fit (`TrainerConfig.decoder_refit_tokens`).

The trainer keeps the batches of the last steps (`decoder_refit_tokens` tokens, at most half the
run's). When training ends, the trained encoder encodes them again, and their codes z and targets
y go into the normal equations of "reconstruct y from z", with the decoder bias as one more latent
that is always 1. `W_dec` and `b_dec` become their ridge solution, pulled towards the trained
weights:

    (Σ z'ᵀz' + λI) [W_dec; b_dec] = Σ z'ᵀy + λ [W_dec; b_dec]_trained,   z' = [z, 1],

with λ = `decoder_refit_ridge` times the mean diagonal of Σ z'ᵀz' (the mean squared code of a
latent), so a latent that fired on only a few of the kept tokens keeps about its trained row.
With an evaluator (the runner's held-out rows) the refit is undone if it lowers the held-out
explained variance. The encoder is untouched, so the same latents fire on the same tokens; only what they write
changes. (When the encoder subtracts b_dec from its input, the encoder bias absorbs the change of
b_dec, so the pre-activations stay exactly as they were.)

Why: in a short run the decoder lags the encoder. For fixed codes the best decoder is a linear
least-squares problem, solved exactly here instead of approached by SGD: the dictionary update of
the method of optimal directions (Engan et al. 1999), done once. Codes from the trained encoder
fit better than the codes each batch had when it was trained on (the encoder was still moving);
on the quality benchmark the refit cuts held-out FVU by 2-8% (docs/quality.md).

Only for SAEs whose training codes are sparse (`supports_decoder_refit`: TopK and BatchTopK, not
Matryoshka, whose nested losses a plain least-squares fit would undo). The decoder rows end up
off unit norm; inference does not need them there.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens import distributed
from sae_lens.kernels.csr import SparsityPattern, choose_kernels, scatter_rows


class DecoderRefit:
    """The accumulated normal equations of one SAE's decoder (float64, `[d_sae + 1]` squared)."""

    def __init__(self, d_sae: int, d_out: int, device: torch.device | str) -> None:
        self.upper = torch.zeros(d_sae + 1, d_sae + 1, dtype=torch.float64, device=device)
        """The upper triangle of Σ z'ᵀz' over the accumulated tokens, z' = [z, 1] (the last row and
        column: the bias), the diagonal included; zeros below it."""
        self.cross = torch.zeros(d_sae + 1, d_out, dtype=torch.float64, device=device)
        """Σ z'ᵀy."""
        self.target_square = torch.zeros((), dtype=torch.float64, device=device)
        """Σ ‖y‖², to state the objective before and after."""

    @staticmethod
    def memory_bytes(d_sae: int) -> int:
        """What the Gram matrix takes (the solve needs about as much again)."""
        return 8 * (d_sae + 1) ** 2

    @torch.no_grad()
    def add(self, codes: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `codes` `[batch, d_sae]` (sparse COO or dense), `target` `[batch, d_out]`."""
        d_sae = self.upper.shape[0] - 1
        sparse = codes.coalesce() if codes.is_sparse else codes.to_sparse_coo()
        (rows, cols), values = sparse.indices(), sparse.values().float()
        y = target.float()
        pattern = SparsityPattern.from_entries(rows, cols, y.shape[0], d_sae)
        # Each pair of entries of a token, the later one at or after the earlier (the COO is sorted
        # by token, then latent): the upper triangle of the Gram matrix, mirrored in `gram`.
        # Entry e pairs with itself and the rest of its token's entries.
        ends = pattern.offsets[1:][rows]
        position = torch.arange(rows.numel(), device=rows.device)
        partners = ends - position
        left = torch.repeat_interleave(position, partners)
        first_pair = partners.cumsum(0) - partners
        right = left + torch.arange(left.numel(), device=rows.device) - first_pair[left]
        self.upper.view(-1).index_add_(
            0, cols[left] * (d_sae + 1) + cols[right], (values[left] * values[right]).double()
        )
        self.upper[:d_sae, d_sae].index_add_(0, cols, values.double())
        self.upper[d_sae, d_sae] += y.shape[0]
        # Σ z_ti y_t per latent i, without a [nnz, d_out] temporary (the decoder gradient's kernel).
        use_spmm = choose_kernels("auto", y.dtype, y.device).spmm_scatter
        self.cross[:d_sae] += scatter_rows(pattern, values, y, use_spmm)
        self.cross[d_sae] += y.sum(dim=0)
        self.target_square += y.double().pow(2).sum()

    @property
    def gram(self) -> torch.Tensor:
        """Σ z'ᵀz' `[d_sae + 1, d_sae + 1]` (a new tensor, from the accumulated upper triangle)."""
        return self.upper + self.upper.triu(1).T

    def objective(self, weights: torch.Tensor) -> float:
        """Σ ‖y - z'W‖² over the accumulated tokens for `weights` = [W_dec; b_dec] `[d_sae + 1, d_out]`."""
        w = weights.double()
        return float(self.target_square - 2 * (w * self.cross).sum() + (w * self._gram_times(w)).sum())

    def _gram_times(self, w: torch.Tensor) -> torch.Tensor:
        """Σ z'ᵀz' @ w from the upper triangle alone (no full matrix is built)."""
        upper = self.upper
        return upper @ w + upper.T @ w - upper.diagonal()[:, None] * w

    @torch.no_grad()
    def solve(
        self, W_dec: torch.Tensor, b_dec: torch.Tensor, ridge: float = 1.0, data_parallel: bool = False
    ) -> tuple[torch.Tensor, float, float] | None:
        """`([W_dec; b_dec] refitted, objective before, objective after)`, or None when nothing was
        accumulated or the fit is not better (the trained weights then stay). `data_parallel`:
        every rank trains this SAE on its own batches, so their equations are summed first."""
        if data_parallel:
            for tensor in (self.upper, self.cross, self.target_square):
                distributed.sum_(tensor)
        d_sae = self.upper.shape[0] - 1
        if self.upper[d_sae, d_sae] <= 0:
            return None
        trained = torch.cat([W_dec, b_dec[None, :]]).double()
        lam = ridge * self.upper.diagonal()[:d_sae].mean().clamp_min(1e-12)
        # The factorisation reads the upper triangle only, so the accumulated one is enough.
        diagonal = self.upper.diagonal()
        diagonal.add_(lam)
        factor, info = torch.linalg.cholesky_ex(self.upper, upper=True)
        diagonal.sub_(lam)
        if int(info) != 0:
            return None
        refitted = torch.cholesky_solve(self.cross + lam * trained, factor, upper=True)
        del factor
        before, after = self.objective(trained), self.objective(refitted)
        if not after < before:
            return None
        return refitted.to(W_dec.dtype), before, after


@torch.no_grad()
def apply_refit(sae: Any, weights: torch.Tensor) -> None:
    """Put `weights` = [W_dec; b_dec] `[d_sae + 1, d_out]` (from `DecoderRefit.solve`) into `sae`.
    When the encoder sees x - b_dec, b_enc absorbs the change of b_dec, so the pre-activations
    (and so the codes) stay exactly as they were."""
    new_b_dec = weights[-1]
    if sae.cfg.apply_b_dec_to_input:
        sae.b_enc.add_((new_b_dec - sae.b_dec) @ sae.W_enc)
    sae.W_dec.copy_(weights[:-1])
    sae.b_dec.copy_(new_b_dec)
