"""Serving batches from a shuffled buffer: what the model-fed and the cache-fed stores share.

Both stores keep a buffer of `n_batches_in_buffer x train_batch_size` activations (every hooked
point side by side, `hook_widths` columns each), serve half of it in shuffled order, then refill the
served half. How a refill gets its rows is each store's own (`_advance`); serving them, splitting
them by hook, and the buffer's part of the store's state dict are here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class DatasetExhausted(StopIteration):
    """The store has no more tokens to serve."""


class ShuffleBufferServing:
    """Batches from the shuffled buffer; a store defines `_advance` and the attributes below."""

    train_batch_size: int
    n_batches_in_buffer: int
    hook_points: list[str]
    hook_point: str
    hook_widths: dict[str, int]
    device: torch.device
    tokens_served: int
    _buffer: torch.Tensor | None
    _position: int
    _n_serve: int
    _exhausted: bool
    _finished: bool

    exhausted_message = "the dataset has no more tokens"
    """What `DatasetExhausted` says at the end."""

    @property
    def buffer_size(self) -> int:
        """Activations (rows) the buffer holds when full."""
        return self.n_batches_in_buffer * self.train_batch_size

    def _advance(self) -> bool:
        """Refill the served part of the buffer and shuffle it; False when nothing is left."""
        raise NotImplementedError

    def _next_rows(self) -> torch.Tensor:
        while not self._finished and (self._buffer is None or self._position >= self._n_serve):
            if not self._advance():
                self._finished = True
        if self._finished:
            raise DatasetExhausted(self.exhausted_message)
        assert self._buffer is not None
        batch = self._buffer[self._position : self._position + self.train_batch_size]
        self._position += self.train_batch_size
        self.tokens_served += batch.shape[0]
        return batch.to(self.device)

    def next_batch(self) -> torch.Tensor:
        """The next shuffled `[train_batch_size, d_in]` batch (of the first hook); raises
        DatasetExhausted at the end."""
        batch = self._next_rows()
        return batch if len(self.hook_points) == 1 else batch[:, : self.hook_widths[self.hook_point]]

    def next_batch_by_hook(self) -> dict[str, torch.Tensor]:
        """The next shuffled batch of every hook, `{hook: [train_batch_size, d_hook]}`, same tokens."""
        batch = self._next_rows()
        return dict(zip(self.hook_points, batch.split(list(self.hook_widths.values()), dim=-1), strict=True))

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            try:
                yield self.next_batch()
            except DatasetExhausted:
                return

    def _buffer_state(self) -> dict[str, Any]:
        """The buffer's part of the store's state dict."""
        return {
            "buffer": self._buffer.cpu() if self._buffer is not None else None,
            "position": self._position,
            "n_serve": self._n_serve,
            "exhausted": self._exhausted,
            "finished": self._finished,
            "tokens_served": self.tokens_served,
            "hook_widths": dict(self.hook_widths),
            "hook_points": list(self.hook_points),
        }

    def _load_buffer_state(self, state: dict[str, Any], buffer: torch.Tensor | None) -> None:
        """Restore what `_buffer_state` saved, `buffer` already on the store's device and dtype."""
        self._buffer = buffer
        self._position, self._n_serve = int(state["position"]), int(state["n_serve"])
        self._exhausted, self._finished = bool(state["exhausted"]), bool(state["finished"])
        self.tokens_served = int(state["tokens_served"])
