"""Streams documents -> packed token rows -> model activations at one or more hooks -> shuffled batches.

Read top to bottom this is the data path of a run: `next_token_row` packs tokenized documents into
`context_size` rows, `get_activations` runs the model only up to the deepest hooked block, and
`next_batch` serves `[train_batch_size, d_in]` batches from a buffer that is shuffled and refilled
half at a time, so consecutive batches mix activations from many different documents.

All of the store's position is explicit state (the dataset row reached, the tokens waiting to be
packed, the buffer and how much of it was served, the shuffling generator), so `state_dict()` /
`load_state_dict()` continue a run exactly where a checkpoint left it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.dtypes import torch_dtype
from sae_lens.errors import SAELensError
from sae_lens.models import all_special_ids, hook_layer_of, special_token_ids, validate_hook_point
from sae_lens.shuffle_buffer import DatasetExhausted, ShuffleBufferServing
from sae_lens.text_datasets import detect_column, enumerate_documents, load_text_dataset

TOKENIZE_CHUNK = 64
"""Documents tokenized per call: fast tokenizers batch well."""


class ActivationsStore(ShuffleBufferServing):
    """Activations of one hook point (or several, from one forward pass), in shuffled training batches.

    Build it with `ActivationsStore.from_config(model, cfg)`. The first `n_eval_sequences` packed
    rows of the stream are set aside in `eval_tokens` and never used for training. With several
    `hook_points`, `next_batch_by_hook()` gives `{hook: [batch, d_hook]}` for the same tokens (the
    buffer shuffles all hooks with one permutation, so transcoders see aligned input/output pairs).
    """

    def __init__(
        self,
        model: Any,
        dataset: Iterable[dict[str, Any]],
        *,
        hook_point: str | None = None,
        hook_layer: int | None = None,
        context_size: int,
        train_batch_size: int,
        store_batch_size: int = 32,
        n_batches_in_buffer: int = 32,
        hook_head_index: int | None = None,
        column: str = "text",
        is_tokenized: bool = False,
        prepend_bos: bool = True,
        exclude_special_tokens: bool = False,
        n_eval_sequences: int = 0,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        seed: int = 0,
        hook_points: Sequence[str] | None = None,
    ) -> None:
        hooks = list(hook_points) if hook_points else [hook_point] if hook_point else []
        if not hooks:
            raise SAELensError("an ActivationsStore needs hook_point (or hook_points)")
        for hook in hooks:
            validate_hook_point(model, hook)
        self.model = model
        self.dataset = dataset
        self.hook_points = hooks
        self.hook_point = hooks[0]
        layers = [hook_layer_of(hook) or 0 for hook in hooks]
        self.hook_layer = hook_layer if hook_layer is not None and len(hooks) == 1 else max(layers)
        """The deepest hooked block: the model stops after it."""
        self.hook_head_index = hook_head_index
        self.context_size = context_size
        self.train_batch_size = train_batch_size
        self.store_batch_size = store_batch_size
        self.n_batches_in_buffer = max(2, n_batches_in_buffer)
        self.column = column
        self.is_tokenized = is_tokenized
        self.prepend_bos = prepend_bos
        self.dtype = torch_dtype(dtype)
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

        # Where the stream is: every dataset row before `rows_consumed` has been packed or is in
        # `pending`; the documents iterator restarts from there after `load_state_dict`.
        self.rows_consumed = 0
        self.pending: list[int] = []
        self._documents = self._document_tokens(0)
        self.hook_widths: dict[str, int] = {}
        self._buffer: torch.Tensor | None = None
        self._position = 0
        self._n_serve = 0
        self._exhausted = False
        self._finished = False
        self.tokens_served = 0
        try:
            self.eval_tokens = self.get_batch_tokens(n_eval_sequences) if n_eval_sequences else None
        except DatasetExhausted:
            raise SAELensError(
                f"the dataset is too short: it does not fill one row of context_size={context_size} "
                "tokens; use more data or a smaller context_size"
            ) from None

    @classmethod
    def from_config(
        cls,
        model: Any,
        cfg: LanguageModelSAERunnerConfig,
        dataset: Iterable[dict[str, Any]] | None = None,
        hook_points: Sequence[str] | None = None,
    ) -> ActivationsStore:
        """A store reading `cfg.dataset_path` (or the given `dataset`) through `model`, at
        `cfg.hook_point` (or `hook_points`)."""
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
            hook_points=hook_points,
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
            dtype=cfg.dtype,
            device=cfg.device,
            seed=cfg.seed,
        )

    # -- tokens ---------------------------------------------------------------------------------

    def _document_tokens(self, start: int) -> Iterator[tuple[int, list[int]]]:
        """`(row index, token ids)` of each non-empty document from dataset row `start` on."""
        documents = enumerate_documents(self.dataset, self.column, self.is_tokenized, start)
        if self.is_tokenized:
            yield from documents  # type: ignore[misc]  # lists of ids when tokenized
            return
        tokenizer = self.model.tokenizer
        while chunk := list(itertools.islice(documents, TOKENIZE_CHUNK)):
            encoded = tokenizer([text for _, text in chunk], add_special_tokens=False, verbose=False)
            yield from zip((index for index, _ in chunk), encoded["input_ids"], strict=True)

    def next_token_row(self) -> torch.Tensor | None:
        """The next packed `[context_size]` row, or None at the end of the dataset.

        Documents are joined with the separator token; every row opens with the start token
        (BOS, or [CLS] for BERT) when `prepend_bos`, including rows that continue a long document,
        because the model never saw a sequence without one. Pretokenized rows that already have
        exactly `context_size` tokens are used as they are.
        """
        body = self.context_size - 1 if self.prepend_bos else self.context_size
        while len(self.pending) < body:
            item = next(self._documents, None)
            if item is None:
                return None
            index, tokens = item
            self.rows_consumed = index + 1
            if self.is_tokenized and len(tokens) == self.context_size:
                return torch.tensor(tokens, dtype=torch.long)
            if self.pending and self.separator_token_id is not None:
                self.pending.append(self.separator_token_id)
            self.pending.extend(tokens)
        row, self.pending = self.pending[:body], self.pending[body:]
        if self.prepend_bos:
            row = [self.start_token_id, *row]
        return torch.tensor(row, dtype=torch.long)

    def get_batch_tokens(self, batch_size: int | None = None) -> torch.Tensor:
        """The next `[batch_size, context_size]` packed rows (default `store_batch_size`)."""
        batch_size = batch_size or self.store_batch_size
        rows: list[torch.Tensor] = []
        while len(rows) < batch_size and (row := self.next_token_row()) is not None:
            rows.append(row)
        if not rows:
            raise DatasetExhausted("the dataset has no more tokens")
        return torch.stack(rows)

    # -- activations ----------------------------------------------------------------------------

    @torch.no_grad()
    def get_activations_by_hook(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations `{hook: [batch, context_size, d_hook]}`; the model stops after the deepest block."""
        _, cache = self.model.run_with_cache(
            tokens.to(self.device),
            names_filter=self.hook_points,
            stop_at_layer=self.hook_layer + 1,
        )
        result = {}
        for hook in self.hook_points:
            acts = cache[hook]
            if self.hook_head_index is not None and acts.ndim == 4:
                acts = acts[:, :, self.hook_head_index]
            elif acts.ndim == 4:  # per-head hooks train on all heads concatenated
                acts = acts.flatten(-2)
            result[hook] = acts
        return result

    def get_activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """Activations `[batch, context_size, d_in]` at the (first) hook."""
        return self.get_activations_by_hook(tokens)[self.hook_point]

    def kept_activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """Activations of `tokens` `[rows, context]` as `[n_kept_tokens, d_in]`, excluded tokens dropped."""
        return self.kept_activations_by_hook(tokens)[self.hook_point]

    def kept_activations_by_hook(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{hook: [n_kept_tokens, d_hook]}` for `tokens`, excluded tokens dropped."""
        acts = self.get_activations_by_hook(tokens)
        keep = ~torch.isin(tokens, self.excluded_token_ids)
        return {hook: value[keep.to(value.device)].to(self.dtype) for hook, value in acts.items()}

    def _next_flat_activations(self) -> torch.Tensor:
        """Activations of the next store batch, every hook side by side: `[n_kept_tokens, Σ d_hook]`."""
        parts = self.kept_activations_by_hook(self.get_batch_tokens())
        if not self.hook_widths:
            self.hook_widths = {hook: value.shape[-1] for hook, value in parts.items()}
        return parts[self.hook_point] if len(parts) == 1 else torch.cat(list(parts.values()), dim=-1)

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

    # -- the shuffling buffer -------------------------------------------------------------------

    def _shuffle(self) -> None:
        """Shuffle the buffer and decide how much of it to serve before the next refill: half, or
        all of it once the dataset is exhausted."""
        assert self._buffer is not None
        self._buffer = self._buffer[
            torch.randperm(self._buffer.shape[0], generator=self.generator).to(self._buffer.device)
        ]
        n_serve = self._buffer.shape[0] if self._exhausted else self._buffer.shape[0] // 2
        self._n_serve = n_serve - n_serve % self.train_batch_size
        self._position = 0

    def _advance(self) -> bool:
        """Refill the served part of the buffer with new activations; False when nothing is left."""
        if self._buffer is None:
            try:
                self._buffer = self._fill(self.buffer_size)
            except DatasetExhausted:
                return False
            self._exhausted = self._buffer.shape[0] < self.buffer_size
            self._shuffle()
            return True
        if self._exhausted:
            return False
        kept = self._buffer[self._n_serve :]
        try:
            fresh = self._fill(self.buffer_size - kept.shape[0])
        except DatasetExhausted:
            fresh = kept[:0]
        self._exhausted = fresh.shape[0] < self.buffer_size - kept.shape[0]
        self._buffer = torch.cat([kept, fresh])
        if self._buffer.shape[0] < self.train_batch_size:
            return False
        self._shuffle()
        return True

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: dataset row, pending tokens, the buffer and its position, the RNG."""
        return {
            "rows_consumed": self.rows_consumed,
            "pending": list(self.pending),
            "generator": self.generator.get_state(),
            **self._buffer_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned (for a store over the same data and hooks)."""
        if state["hook_points"] != self.hook_points:
            raise SAELensError(
                f"the saved store read hooks {state['hook_points']}, this one reads {self.hook_points}"
            )
        self.rows_consumed = int(state["rows_consumed"])
        self.pending = [int(token) for token in state["pending"]]
        self._documents = self._document_tokens(self.rows_consumed)
        self.generator.set_state(state["generator"])
        buffer = state["buffer"]
        self._load_buffer_state(state, buffer.to(self.device, self.dtype) if buffer is not None else None)
        self.hook_widths = dict(state["hook_widths"])
