"""Streams documents -> packed token rows -> model activations at one hook -> shuffled training batches.

Read top to bottom this is the data path of a run: `iter_token_rows` packs tokenized documents into
`context_size` rows, `get_activations` runs the model only up to the hooked block, and `next_batch`
serves `[train_batch_size, d_in]` batches from a buffer that is shuffled and refilled half at a time,
so consecutive batches mix activations from many different documents.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.models import all_special_ids, special_token_ids, validate_hook_point
from sae_lens.saes.sae import DTYPES


class DatasetExhausted(StopIteration):
    """The dataset ran out before the requested number of activations."""


class ActivationsStore:
    """Activations of one hook point, served in shuffled training batches.

    Build it with `ActivationsStore.from_config(model, cfg)`. The first `n_eval_sequences` packed
    rows of the stream are set aside in `eval_tokens` and never used for training.
    """

    def __init__(
        self,
        model: Any,
        dataset: Iterable[dict[str, Any]],
        *,
        hook_point: str,
        hook_layer: int,
        context_size: int,
        train_batch_size: int,
        store_batch_size: int = 32,
        n_batches_in_buffer: int = 8,
        hook_head_index: int | None = None,
        column: str = "text",
        is_tokenized: bool = False,
        prepend_bos: bool = True,
        exclude_special_tokens: bool = False,
        n_eval_sequences: int = 0,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        validate_hook_point(model, hook_point)
        self.model = model
        self.dataset = dataset
        self.hook_point = hook_point
        self.hook_layer = hook_layer
        self.hook_head_index = hook_head_index
        self.context_size = context_size
        self.train_batch_size = train_batch_size
        self.store_batch_size = store_batch_size
        self.n_batches_in_buffer = max(2, n_batches_in_buffer)
        self.column = column
        self.is_tokenized = is_tokenized
        self.prepend_bos = prepend_bos
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

        tokenizer = model.tokenizer
        framing = special_token_ids(tokenizer)
        if framing["start"] is None and prepend_bos:
            raise SAELensError("the tokenizer has no BOS/CLS token; set prepend_bos to false")
        self.start_token_id: int = framing["start"] or 0
        self.separator_token_id = framing["separator"]
        # Padding never carries meaning; other special tokens are dropped only when asked, since
        # their activations (huge-norm BOS/CLS positions especially) can dominate an SAE's loss.
        excluded = set(all_special_ids(tokenizer)) if exclude_special_tokens else set()
        pad = framing["pad"]
        if pad is not None and pad not in (self.start_token_id, self.separator_token_id):
            excluded.add(pad)
        self.excluded_token_ids = torch.tensor(sorted(excluded), dtype=torch.long)

        self._rows = self.iter_token_rows()
        try:
            self.eval_tokens = self.get_batch_tokens(n_eval_sequences) if n_eval_sequences else None
        except DatasetExhausted:
            raise SAELensError(
                f"the dataset is too short: it does not fill one row of context_size={context_size} "
                "tokens; use more data or a smaller context_size"
            ) from None
        self._buffer: torch.Tensor | None = None
        self._batches: Iterator[torch.Tensor] | None = None
        self.tokens_served = 0

    @classmethod
    def from_config(
        cls,
        model: Any,
        cfg: LanguageModelSAERunnerConfig,
        dataset: Iterable[dict[str, Any]] | None = None,
    ) -> ActivationsStore:
        """A store reading `cfg.dataset_path` (or the given `dataset`) through `model`."""
        from sae_lens.text_datasets import detect_column, load_text_dataset

        if dataset is None:
            dataset = load_text_dataset(cfg.dataset_path, split=cfg.dataset_split, streaming=cfg.streaming)
        column, is_tokenized = detect_column(dataset)
        if cfg.is_dataset_tokenized is not None and cfg.is_dataset_tokenized != is_tokenized:
            raise SAELensError(
                f"is_dataset_tokenized={cfg.is_dataset_tokenized} but the dataset's {column!r} "
                f"column is {'token ids' if is_tokenized else 'text'}; fix or unset the field"
            )
        return cls(
            model,
            dataset,
            hook_point=cfg.hook_point,
            hook_layer=cfg.hook_layer,
            hook_head_index=cfg.hook_point_head_index,
            context_size=cfg.context_size,
            train_batch_size=cfg.train_batch_size,
            store_batch_size=cfg.store_batch_size,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            column=column,
            is_tokenized=is_tokenized,
            prepend_bos=cfg.prepend_bos,
            exclude_special_tokens=cfg.exclude_special_tokens,
            n_eval_sequences=cfg.n_eval_sequences,
            device=cfg.device,
            seed=cfg.seed,
        )

    # -- tokens ---------------------------------------------------------------------------------

    def _iter_documents(self) -> Iterator[list[int]]:
        """Token ids of each document, tokenized in chunks (fast tokenizers batch well)."""
        chunk: list[str] = []
        tokenizer = self.model.tokenizer
        for row in self.dataset:
            value = row[self.column]
            if self.is_tokenized:
                yield [int(t) for t in value]
                continue
            chunk.append(value)
            if len(chunk) == 64:
                yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
                chunk = []
        if chunk:
            yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]

    def iter_token_rows(self) -> Iterator[torch.Tensor]:
        """Pack documents into `[context_size]` rows.

        Documents are joined with the separator token; every row opens with the start token
        (BOS, or [CLS] for BERT) when `prepend_bos`, including rows that continue a long document,
        because the model never saw a sequence without one. Pretokenized rows that already have
        exactly `context_size` tokens are used as they are.
        """
        body = self.context_size - 1 if self.prepend_bos else self.context_size
        pending: list[int] = []
        for tokens in self._iter_documents():
            if self.is_tokenized and len(tokens) == self.context_size:
                yield torch.tensor(tokens, dtype=torch.long)
                continue
            if pending and self.separator_token_id is not None:
                pending.append(self.separator_token_id)
            pending.extend(tokens)
            while len(pending) >= body:
                row, pending = pending[:body], pending[body:]
                if self.prepend_bos:
                    row = [self.start_token_id, *row]
                yield torch.tensor(row, dtype=torch.long)

    def get_batch_tokens(self, batch_size: int | None = None) -> torch.Tensor:
        """The next `[batch_size, context_size]` packed rows (default `store_batch_size`)."""
        batch_size = batch_size or self.store_batch_size
        rows = list(itertools.islice(self._rows, batch_size))
        if not rows:
            raise DatasetExhausted("the dataset has no more tokens")
        return torch.stack(rows)

    # -- activations ----------------------------------------------------------------------------

    @torch.no_grad()
    def get_activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """Activations `[batch, context_size, d_in]` at the hook; the model stops after its block."""
        _, cache = self.model.run_with_cache(
            tokens.to(self.device),
            names_filter=[self.hook_point],
            stop_at_layer=self.hook_layer + 1,
        )
        acts = cache[self.hook_point]
        if self.hook_head_index is not None:
            acts = acts[:, :, self.hook_head_index]
        elif acts.ndim == 4:  # per-head hooks train on all heads concatenated
            acts = acts.flatten(-2)
        return acts

    def kept_activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """Activations of `tokens` `[rows, context]` as `[n_kept_tokens, d_in]`, excluded tokens dropped."""
        acts = self.get_activations(tokens)
        keep = ~torch.isin(tokens, self.excluded_token_ids).to(acts.device)
        return acts[keep].to(self.dtype)

    def _next_flat_activations(self) -> torch.Tensor:
        """Activations of the next store batch, `[n_kept_tokens, d_in]`."""
        return self.kept_activations(self.get_batch_tokens())

    def _fill(self, n_tokens: int) -> torch.Tensor:
        """At least `n_tokens` new activations, or fewer if the dataset ends first."""
        parts: list[torch.Tensor] = []
        total = 0
        while total < n_tokens:
            try:
                part = self._next_flat_activations()
            except DatasetExhausted:
                break
            parts.append(part)
            total += part.shape[0]
        if not parts:
            raise DatasetExhausted("the dataset has no more tokens")
        return torch.cat(parts)

    def _iter_batches(self) -> Iterator[torch.Tensor]:
        """The buffer: shuffle, serve half, refill that half with new activations, repeat."""
        size = self.n_batches_in_buffer * self.train_batch_size
        try:
            buffer = self._fill(size)
        except DatasetExhausted:
            # DatasetExhausted is a StopIteration: raised inside this generator it would become a
            # RuntimeError (PEP 479). Ending the generator lets next_batch raise it instead.
            return
        exhausted = buffer.shape[0] < size
        while True:
            buffer = buffer[torch.randperm(buffer.shape[0], generator=self.generator).to(buffer.device)]
            n_serve = buffer.shape[0] if exhausted else buffer.shape[0] // 2
            n_serve -= n_serve % self.train_batch_size
            for start in range(0, n_serve, self.train_batch_size):
                yield buffer[start : start + self.train_batch_size]
            if exhausted:
                return
            kept = buffer[n_serve:]
            try:
                fresh = self._fill(size - kept.shape[0])
            except DatasetExhausted:
                fresh = kept[:0]
            exhausted = fresh.shape[0] < size - kept.shape[0]
            buffer = torch.cat([kept, fresh])
            if buffer.shape[0] < self.train_batch_size:
                return

    def next_batch(self) -> torch.Tensor:
        """The next shuffled `[train_batch_size, d_in]` batch; raises DatasetExhausted at the end."""
        if self._batches is None:
            self._batches = self._iter_batches()
        batch = next(self._batches, None)
        if batch is None:
            raise DatasetExhausted("the dataset has no more tokens")
        self.tokens_served += batch.shape[0]
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            try:
                yield self.next_batch()
            except DatasetExhausted:
                return
