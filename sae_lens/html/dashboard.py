"""Feature dashboards: plain Python statistics in, one self-contained offline HTML file out.

Input schema (a JSON-serialisable `dict`; tuples are accepted where lists are shown)::

    {
      "title": str,
      "sae": {"name": str, "architecture": str, "d_in": int, "d_sae": int,
              "model_name": str, "hook_name": str},
      "n_tokens": int,                          # tokens the statistics were collected over
      "interval_kind": "quantile" | "equal_width",
      "logit_source": "W_U" | "tied_embeddings" | None,
      "features": [                             # the features shown, in index order
        {"index": int,                          # 0 <= index < d_sae, unique
         "density": float,                      # fraction of the n_tokens on which it fires, in [0, 1]
         "max_act": float, "mean_act": float,   # mean over firing tokens
         "top_examples": [{"tokens": [str, ...], "acts": [float, ...]}, ...],   # windows around the max
         "intervals": [{"low": float, "high": float, "examples": [{"tokens": [...], "acts": [...]}]}],
         "histogram": {"edges": [float, ...], "counts": [int, ...]},   # of nonzero acts; n + 1 edges
         "logits": {"top": [[str, float], ...], "bottom": [[str, float], ...]} | None,
         "nearest": [[int, float], ...],        # feature index, decoder cosine (whole dictionary)
         "correlated": [[int, float], ...]},    # feature index, correlation of activations
        ...
      ],
      "prompt": None | {"text": str, "tokens": [str, ...],
                        "top_features": [[[int, float], ...], ...]},   # one list per token
    }

`tokens` are decoded token strings (" the", "##ing", "\\n"); the `tokens` and `acts` of one example
pair up one to one. `nearest`/`correlated` may name features that are not in `features`: the page
shows those without a link.

What is inlined: one gzip stream, base64-encoded in a `<script type="application/json">` data block
and unpacked by the page with the browser's `DecompressionStream`::

    uint32 L | L bytes of JSON header | zero padding to a multiple of 4 | four little-endian arrays:
    context_lengths uint32[n_contexts] | act_scales float32[n_features] |
    token_ids uint16 or uint32[n_context_tokens] (id_bytes) | acts int16[n_context_tokens]

    header = {"v": 2, "meta": {title, sae, n_tokens, interval_kind, logit_source},
              "vocab": [str, ...],              # every token string once, most frequent first
              "n_contexts": int, "n_context_tokens": int, "id_bytes": 2 | 4,
              "features": [[index, density, max_act, mean_act, n_top, [[low, high, n_examples], ...],
                            [[edge, ...], [count, ...]], logits, [[feature, ...], [cosine, ...]],
                            [[feature, ...], [correlation, ...]]], ...],
              "prompt": null | {"text": str, "tokens": [id, ...], "top": [[[feature, ...], [value, ...]], ...]}}
    logits = null | [[top ids], [top values], [bottom ids], [bottom values]]

The contexts are stored feature by feature (its top examples, then each interval's examples, in
order). An activation is stored as round(act / scale * 32767) with `scale` the feature's largest
|act| in its contexts, so it is exact to 1/32767 of that: three or more significant digits for every
value that shades visibly. The JSON numbers are rounded to 3 significant digits (histogram edges
to 4). Token strings live once in `vocab`; contexts hold their ids. Typed arrays make a 6,144-feature
page a few seconds to write and a fraction of a second to open; the page builds DOM only for the
selected feature and for the rows of the feature list that are on screen.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
import struct
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from itertools import chain, count
from pathlib import Path
from typing import Any

import numpy as np

from sae_lens.errors import SAELensError
from sae_lens.html.page import atomic_write_text, html_page, read_asset

INTERVAL_KINDS = ("quantile", "equal_width")
LOGIT_SOURCES = ("W_U", "tied_embeddings", None)
PAYLOAD_VERSION = 2
ACT_LEVELS = 32767  # int16 quantisation steps between 0 and a feature's largest |activation|
DATA_BLOCK_START = '<script type="application/json" id="sae-data" data-encoding="gzip+base64">'
_SAE_KEYS = ("name", "architecture", "d_in", "d_sae", "model_name", "hook_name")
_FEATURE_KEYS = (
    "index",
    "density",
    "max_act",
    "mean_act",
    "top_examples",
    "intervals",
    "histogram",
    "logits",
    "nearest",
    "correlated",
)

_SEQ_TYPES = {list, tuple}
_fmt3 = "{:.3g}".format
_fmt4 = "{:.4g}".format


def _fail(where: str, problem: str) -> SAELensError:
    return SAELensError(f"dashboard data: {where}: {problem}")


def _is_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _number(value: Any, where: str) -> float:
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise _fail(where, f"expected a number, got {type(value).__name__} {value!r:.40}")
    number = float(value)
    if not math.isfinite(number):
        raise _fail(where, f"expected a finite number, got {number}")
    return number


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise _fail(where, f"expected an integer, got {type(value).__name__} {value!r:.40}")
    return int(value)


def _numbers(values: Sequence[Any], where: str, fmt: Any = _fmt3) -> str:
    """Comma-joined numbers rounded by `fmt` (3 significant digits): one string op per list."""
    try:
        text = ",".join(map(fmt, values))
    except (TypeError, ValueError) as error:
        bad = next((v for v in values if isinstance(v, (str, bytes)) or v is None), None)
        raise _fail(where, f"expected numbers, got {bad!r:.40}") from error
    # 'nan', 'inf' and '-inf' are the only formatted numbers that contain an 'n'.
    if "n" in text:
        raise _fail(where, "contains a non-finite value (nan or inf)")
    return text


def _pairs(value: Any, where: str, d_sae: int) -> tuple[str, str]:
    """([feature, value], ...) validated, as the JSON texts of the feature list and the value list."""
    if not _is_seq(value):
        raise _fail(where, f"expected a list of [feature, value] pairs, got {type(value).__name__}")
    # Fast path: plain ints in range and pairs of two; anything else takes the checking loop below,
    # which also finds the offending entry for the message.
    if value and set(map(type, value)) <= _SEQ_TYPES and set(map(len, value)) == {2}:
        features = [p[0] for p in value]
        if set(map(type, features)) == {int} and min(features) >= 0 and max(features) < d_sae:
            return ",".join(map(str, features)), _numbers([p[1] for p in value], where)
    checked, values = [], []
    for i, pair in enumerate(value):
        if not _is_seq(pair) or len(pair) != 2:
            raise _fail(f"{where}[{i}]", f"expected [feature index, value], got {pair!r:.60}")
        feature = _integer(pair[0], f"{where}[{i}][0]")
        if not 0 <= feature < d_sae:
            raise _fail(
                f"{where}[{i}][0]", f"feature index {feature} is outside 0..{d_sae - 1} (d_sae={d_sae})"
            )
        checked.append(feature)
        values.append(_number(pair[1], f"{where}[{i}][1]"))
    return ",".join(map(str, checked)), _numbers(values, where)


def _integers_text(values: Any, where: str) -> str:
    if _is_seq(values) and {type(v) for v in values} <= {int}:
        return ",".join(map(str, values))
    return ",".join(str(_integer(v, f"{where}[{i}]")) for i, v in enumerate(values))


class _Encoder:
    """Validates schema data and splits it into the JSON header and the typed context arrays.

    Pass 1 (`add_feature`) checks every feature and queues its contexts; the vocabulary is then built
    from all token strings; pass 2 (`finish`) turns the contexts into arrays with numpy, so no Python
    code runs per activation.
    """

    def __init__(self, d_sae: int) -> None:
        self.d_sae = d_sae
        self.tokens: list[Sequence[str]] = []  # one entry per context, in payload order
        self.acts: list[Sequence[float]] = []
        self.first_context: list[int] = []  # per feature: its first context's position
        self.feature_parts: list[tuple[str, Any, str]] = []  # (text before logits, logits, text after)
        self.indices: set[int] = set()

    def _queue_contexts(self, examples: Any, where: str) -> int:
        if not _is_seq(examples):
            raise _fail(where, f"expected a list of examples, got {type(examples).__name__}")
        # Fast path, all in C: every example a dict of two equally long lists. The loop below runs only
        # to name the example that breaks the rule.
        try:
            tokens = [example["tokens"] for example in examples]
            acts = [example["acts"] for example in examples]
            valid = (
                set(map(type, examples)) <= {dict}
                and set(map(type, tokens)) | set(map(type, acts)) <= _SEQ_TYPES
                and list(map(len, tokens)) == list(map(len, acts))
            )
        except (TypeError, KeyError, IndexError):
            valid = False
        if not valid:
            for i, example in enumerate(examples):
                if not isinstance(example, dict) or "tokens" not in example or "acts" not in example:
                    raise _fail(f"{where}[{i}]", "expected {'tokens': [...], 'acts': [...]}")
                if not _is_seq(example["tokens"]) or not _is_seq(example["acts"]):
                    raise _fail(f"{where}[{i}]", "'tokens' and 'acts' must be lists")
                n_tokens, n_acts = len(example["tokens"]), len(example["acts"])
                if n_tokens != n_acts:
                    raise _fail(
                        f"{where}[{i}]", f"{n_tokens} tokens but {n_acts} acts; they must pair up one to one"
                    )
            # Valid after all (say, list subclasses): collect them the slow way.
            tokens = [example["tokens"] for example in examples]
            acts = [example["acts"] for example in examples]
        self.tokens += tokens
        self.acts += acts
        return len(tokens)

    def add_feature(self, position: int, feature: Any) -> None:
        where = f"features[{position}]"
        if not isinstance(feature, dict):
            raise _fail(where, f"expected a dict, got {type(feature).__name__}")
        missing = [key for key in _FEATURE_KEYS if key not in feature]
        if missing:
            raise _fail(where, f"missing keys {missing}")
        index = _integer(feature["index"], f"{where}.index")
        if not 0 <= index < self.d_sae:
            raise _fail(f"{where}.index", f"{index} is outside 0..{self.d_sae - 1} (d_sae={self.d_sae})")
        if index in self.indices:
            raise _fail(f"{where}.index", f"feature {index} appears more than once")
        self.indices.add(index)
        where = f"features[{position}] (feature {index})"
        density = _number(feature["density"], f"{where}.density")
        if not 0 <= density <= 1:
            raise _fail(f"{where}.density", f"{density} is not a fraction in [0, 1]")
        head = _numbers(
            [
                density,
                _number(feature["max_act"], f"{where}.max_act"),
                _number(feature["mean_act"], f"{where}.mean_act"),
            ],
            where,
        )
        self.first_context.append(len(self.tokens))
        n_top = self._queue_contexts(feature["top_examples"], f"{where}.top_examples")

        intervals = feature["intervals"]
        if not _is_seq(intervals):
            raise _fail(f"{where}.intervals", "expected a list")
        interval_parts = []
        for i, interval in enumerate(intervals):
            iw = f"{where}.intervals[{i}]"
            if not isinstance(interval, dict) or not {"low", "high", "examples"} <= interval.keys():
                raise _fail(iw, "expected {'low': float, 'high': float, 'examples': [...]}")
            low, high = _number(interval["low"], iw + ".low"), _number(interval["high"], iw + ".high")
            if low > high:
                raise _fail(iw, f"low {low} is above high {high}")
            n_examples = self._queue_contexts(interval["examples"], iw + ".examples")
            interval_parts.append(f"[{_fmt3(low)},{_fmt3(high)},{n_examples}]")

        histogram = feature["histogram"]
        if not isinstance(histogram, dict) or not {"edges", "counts"} <= histogram.keys():
            raise _fail(f"{where}.histogram", "expected {'edges': [...], 'counts': [...]}")
        edges, counts = histogram["edges"], histogram["counts"]
        if not _is_seq(edges) or not _is_seq(counts) or (counts and len(edges) != len(counts) + 1):
            raise _fail(
                f"{where}.histogram",
                f"needs len(edges) == len(counts) + 1; got {len(edges)} edges and {len(counts)} counts",
            )
        count_text = _integers_text(counts, f"{where}.histogram.counts")

        logits = feature["logits"]
        if logits is not None:
            if not isinstance(logits, dict) or not {"top", "bottom"} <= logits.keys():
                raise _fail(
                    f"{where}.logits", "expected {'top': [[token, value], ...], 'bottom': [...]} or None"
                )
            sides = []
            for side in ("top", "bottom"):
                pairs = logits[side]
                if not _is_seq(pairs) or any(not _is_seq(p) or len(p) != 2 for p in pairs):
                    raise _fail(f"{where}.logits.{side}", "expected a list of [token string, value] pairs")
                sides.append(
                    ([p[0] for p in pairs], _numbers([p[1] for p in pairs], f"{where}.logits.{side}"))
                )
            logits = sides

        near_f, near_v = _pairs(feature["nearest"], f"{where}.nearest", self.d_sae)
        corr_f, corr_v = _pairs(feature["correlated"], f"{where}.correlated", self.d_sae)
        before = (
            f"[{index},{head},{n_top},[{','.join(interval_parts)}],"
            f"[[{_numbers(edges, where + '.histogram.edges', _fmt4)}],[{count_text}]],"
        )
        after = f",[[{near_f}],[{near_v}]],[[{corr_f}],[{corr_v}]]]"
        self.feature_parts.append((before, logits, after))

    def build_vocab(self, prompt: dict[str, Any] | None) -> list[str]:
        """Give every token string an id, most frequent in the contexts first; sets `self.context_ids`."""
        # A defaultdict whose factory counts up hands out ids in first-seen order in one C-level pass.
        first_seen: defaultdict[str, int] = defaultdict(count().__next__)
        lookup = first_seen.__getitem__
        self.lengths = np.fromiter(map(len, self.tokens), dtype=np.int64, count=len(self.tokens))
        try:
            ids = np.fromiter(
                map(lookup, chain.from_iterable(self.tokens)), dtype=np.int64, count=int(self.lengths.sum())
            )
            for _, logits, _ in self.feature_parts:
                if logits:
                    for token in chain(logits[0][0], logits[1][0]):
                        lookup(token)
            if prompt:
                for token in prompt["tokens"]:
                    lookup(token)
        except TypeError as error:  # an unhashable token, such as a list
            raise _fail("tokens", f"tokens must be decoded strings ({error})") from error
        vocab = list(first_seen)
        if not set(map(type, vocab)) <= {str}:
            bad = next((token for token in vocab if not isinstance(token, str)), None)
            if bad is not None:  # str subclasses (numpy.str_) are fine
                raise _fail("tokens", f"tokens must be decoded strings, got {type(bad).__name__} {bad!r:.40}")
        # Frequent tokens get small ids: the high bytes of the id array are then mostly zero, which gzip
        # squeezes out.
        frequency = np.bincount(ids, minlength=len(vocab))
        order = np.argsort(-frequency, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.context_ids = rank[ids]
        vocab = [vocab[i] for i in order.tolist()]
        self.token_ids = {token: i for i, token in enumerate(vocab)}
        return vocab

    def ids_text(self, tokens: Sequence[str]) -> str:
        return ",".join(map(str, map(self.token_ids.__getitem__, tokens)))

    def feature_texts(self) -> list[str]:
        out = []
        for before, logits, after in self.feature_parts:
            if logits is None:
                middle = "null"
            else:
                (top_tokens, top_values), (bottom_tokens, bottom_values) = logits
                middle = f"[[{self.ids_text(top_tokens)}],[{top_values}],[{self.ids_text(bottom_tokens)}],[{bottom_values}]]"
            out.append(before + middle + after)
        return out

    def _locate(self, context: int) -> str:
        feature = int(np.searchsorted(np.asarray(self.first_context), context, side="right")) - 1
        return f"features[{feature}] (context {context - self.first_context[feature]} of that feature, top examples first)"

    def context_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(context lengths u32, per-feature act scales f32, token ids u16/u32, quantised acts i16, id bytes)."""
        lengths = self.lengths
        total = int(lengths.sum())
        id_dtype, id_bytes = (np.dtype("<u2"), 2) if len(self.token_ids) <= 1 << 16 else (np.dtype("<u4"), 4)
        ids = self.context_ids.astype(id_dtype)
        try:
            acts = np.fromiter(chain.from_iterable(self.acts), dtype=np.float64, count=total)
        except (TypeError, ValueError) as error:
            for c, values in enumerate(self.acts):
                for value in values:
                    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
                        raise _fail(self._locate(c), f"acts must be numbers, got {value!r:.40}") from error
            raise _fail("acts", f"could not be read as numbers ({error})") from error
        finite = np.isfinite(acts)
        if not finite.all():
            bad = int(np.argmin(finite))
            context = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
            raise _fail(self._locate(context), f"acts contain a non-finite value ({acts[bad]})")

        # Each feature's scale is the largest |act| over its contexts (1 when it has none or all are 0).
        context_offsets = np.concatenate([[0], np.cumsum(lengths)])
        first = np.asarray([*self.first_context, len(self.tokens)], dtype=np.int64)
        token_starts = context_offsets[first]
        per_feature = np.diff(token_starts)
        scales = np.ones(len(self.first_context), dtype=np.float64)
        has_tokens = per_feature > 0
        if total:
            magnitudes = np.abs(acts)
            maxima = np.maximum.reduceat(magnitudes, np.minimum(token_starts[:-1], total - 1))
            scales[has_tokens] = maxima[has_tokens]
        scales[scales == 0] = 1.0
        scales32 = scales.astype("<f4")
        # Quantise feature by feature (no [n_tokens] array of scales), dividing by the float32 scale that is
        # stored so decoding reproduces the quantised value exactly.
        quantised = np.empty(total, dtype="<i2")
        starts = token_starts.tolist()
        for f, scale in enumerate(scales32.tolist()):
            s, e = starts[f], starts[f + 1]
            if e > s:
                # The float32 scale can round below the true max: clip so 32767.4 cannot wrap to -32768.
                quantised[s:e] = np.clip(np.rint(acts[s:e] * (ACT_LEVELS / scale)), -ACT_LEVELS, ACT_LEVELS)
        return lengths.astype("<u4"), scales32, ids, quantised, id_bytes

    def prompt_text(self, prompt: dict[str, Any]) -> str:
        rows = []
        for i, per_token in enumerate(prompt["top_features"]):
            features, values = _pairs(per_token, f"prompt.top_features[{i}]", self.d_sae)
            rows.append(f"[[{features}],[{values}]]")
        text = json.dumps(prompt["text"], ensure_ascii=False)
        return f'{{"text":{text},"tokens":[{self.ids_text(prompt["tokens"])}],"top":[{",".join(rows)}]}}'


def _validate_top_level(data: Any) -> int:
    """Checks the parts of the schema outside `features`; returns d_sae."""
    if not isinstance(data, dict):
        raise SAELensError(f"dashboard data must be a dict, got {type(data).__name__}")
    required = ("title", "sae", "n_tokens", "interval_kind", "logit_source", "features")
    missing = [key for key in required if key not in data]
    if missing:
        raise _fail("top level", f"missing keys {missing}")
    if not isinstance(data["title"], str):
        raise _fail("title", "must be a string")
    sae = data["sae"]
    if not isinstance(sae, dict):
        raise _fail("sae", "must be a dict")
    missing = [key for key in _SAE_KEYS if key not in sae]
    if missing:
        raise _fail("sae", f"missing keys {missing}")
    d_sae = _integer(sae["d_sae"], "sae.d_sae")
    _integer(sae["d_in"], "sae.d_in")
    if d_sae <= 0:
        raise _fail("sae.d_sae", f"must be positive, got {d_sae}")
    n_tokens = _integer(data["n_tokens"], "n_tokens")
    if n_tokens < 0:
        raise _fail("n_tokens", f"must be >= 0, got {n_tokens}")
    if data["interval_kind"] not in INTERVAL_KINDS:
        raise _fail("interval_kind", f"{data['interval_kind']!r} is not one of {list(INTERVAL_KINDS)}")
    if data["logit_source"] not in LOGIT_SOURCES:
        raise _fail("logit_source", f"{data['logit_source']!r} is not one of {list(LOGIT_SOURCES)}")
    if not _is_seq(data["features"]):
        raise _fail("features", f"must be a list, got {type(data['features']).__name__}")
    prompt = data.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, dict) or not {"text", "tokens", "top_features"} <= prompt.keys():
            raise _fail("prompt", "expected None or {'text': str, 'tokens': [...], 'top_features': [...]}")
        if not isinstance(prompt["text"], str):
            raise _fail("prompt.text", "must be a string")
        if not _is_seq(prompt["tokens"]) or not _is_seq(prompt["top_features"]):
            raise _fail("prompt", "'tokens' and 'top_features' must be lists")
        if len(prompt["tokens"]) != len(prompt["top_features"]):
            raise _fail(
                "prompt",
                f"{len(prompt['tokens'])} tokens but {len(prompt['top_features'])} top_features lists; one per token",
            )
    return d_sae


def encode_dashboard_payload(data: dict[str, Any]) -> bytes:
    """Validate `data` (the schema in this module's docstring) and return the binary payload (before gzip).

    Raises `SAELensError` naming the first offending field, e.g.
    `dashboard data: features[3] (feature 17).top_examples[2]: 24 tokens but 23 acts; ...`.
    """
    d_sae = _validate_top_level(data)
    encoder = _Encoder(d_sae)
    for position, feature in enumerate(data["features"]):
        encoder.add_feature(position, feature)
    prompt = data.get("prompt")
    vocab = encoder.build_vocab(prompt)
    lengths, scales, ids, acts, id_bytes = encoder.context_arrays()
    meta = {
        "title": data["title"],
        "sae": {key: data["sae"][key] for key in _SAE_KEYS},
        "n_tokens": int(data["n_tokens"]),
        "interval_kind": data["interval_kind"],
        "logit_source": data["logit_source"],
    }
    header = (
        f'{{"v":{PAYLOAD_VERSION},"meta":{json.dumps(meta, ensure_ascii=False, separators=(",", ":"))},'
        f'"vocab":{json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))},'
        f'"n_contexts":{len(lengths)},"n_context_tokens":{len(ids)},"id_bytes":{id_bytes},'
        f'"features":[{",".join(encoder.feature_texts())}],'
        f'"prompt":{encoder.prompt_text(prompt) if prompt else "null"}}}'
    ).encode()
    padding = b"\0" * (-(4 + len(header)) % 4)
    return b"".join(
        [
            struct.pack("<I", len(header)),
            header,
            padding,
            lengths.tobytes(),
            scales.tobytes(),
            ids.tobytes(),
            acts.tobytes(),
        ]
    )


def decode_dashboard_payload(payload: bytes) -> dict[str, Any]:
    """The inverse of `encode_dashboard_payload`, back to the input schema (acts dequantised).

    For tests and tools; what the page's JavaScript does, in Python.
    """
    (header_length,) = struct.unpack_from("<I", payload, 0)
    header = json.loads(payload[4 : 4 + header_length].decode("utf-8"))
    offset = 4 + header_length + (-(4 + header_length) % 4)
    n_contexts, n_tok = header["n_contexts"], header["n_context_tokens"]
    n_features = len(header["features"])
    lengths = np.frombuffer(payload, "<u4", n_contexts, offset)
    offset += 4 * n_contexts
    scales = np.frombuffer(payload, "<f4", n_features, offset).astype(np.float64)
    offset += 4 * n_features
    ids = np.frombuffer(payload, "<u2" if header["id_bytes"] == 2 else "<u4", n_tok, offset)
    offset += header["id_bytes"] * n_tok
    acts = np.frombuffer(payload, "<i2", n_tok, offset).astype(np.float64)
    vocab = header["vocab"]
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    context = 0
    features = []
    for position, row in enumerate(header["features"]):
        index, density, max_act, mean_act, n_top, intervals, (edges, counts), logits, near, corr = row

        def take(n: int, scale: float = scales[position]) -> list[dict[str, Any]]:
            nonlocal context
            out = []
            for c in range(context, context + n):
                s, e = starts[c], starts[c + 1]
                out.append(
                    {
                        "tokens": [vocab[i] for i in ids[s:e]],
                        "acts": (acts[s:e] * scale / ACT_LEVELS).tolist(),
                    }
                )
            context += n
            return out

        features.append(
            {
                "index": index,
                "density": density,
                "max_act": max_act,
                "mean_act": mean_act,
                "top_examples": take(n_top),
                "intervals": [{"low": lo, "high": hi, "examples": take(n)} for lo, hi, n in intervals],
                "histogram": {"edges": edges, "counts": counts},
                "logits": None
                if logits is None
                else {
                    "top": [[vocab[t], v] for t, v in zip(logits[0], logits[1], strict=True)],
                    "bottom": [[vocab[t], v] for t, v in zip(logits[2], logits[3], strict=True)],
                },
                "nearest": [list(p) for p in zip(*near, strict=True)],
                "correlated": [list(p) for p in zip(*corr, strict=True)],
            }
        )
    prompt = header["prompt"]
    if prompt is not None:
        prompt = {
            "text": prompt["text"],
            "tokens": [vocab[i] for i in prompt["tokens"]],
            "top_features": [[list(p) for p in zip(f, v, strict=True)] for f, v in prompt["top"]],
        }
    return {**header["meta"], "features": features, "prompt": prompt}


def _pack(payload: bytes) -> str:
    # gzip level 2: within ~5% of level 6's size on these arrays at under a quarter of the time; mtime=0 makes
    # the page byte-for-byte reproducible.
    return base64.b64encode(gzip.compress(payload, compresslevel=2, mtime=0)).decode("ascii")


def read_dashboard_data(path: str | Path) -> dict[str, Any]:
    """The data inlined in a page written by `write_dashboard_html`, in the input schema (acts dequantised)."""
    text = Path(path).read_text(encoding="utf-8")
    start = text.find(DATA_BLOCK_START)
    if start < 0:
        raise SAELensError(f"{path} is not a dashboard page written by sae_lens (it has no sae-data block)")
    start += len(DATA_BLOCK_START)
    packed = text[start : text.index("</script>", start)]
    return decode_dashboard_payload(gzip.decompress(base64.b64decode(packed)))


def _body(title: str, packed: str) -> str:
    return (
        '<div id="app" class="app">'
        f'<header class="topbar"><div class="brand">{html.escape(title)}</div></header>'
        '<main class="loading" id="loading">Loading the dashboard…</main>'
        "</div>"
        '<noscript><p class="noscript">This dashboard needs JavaScript: its data is inlined in the page '
        "and drawn on demand.</p></noscript>"
        '<div id="tooltip" class="tooltip" role="tooltip" hidden></div>'
        f"{DATA_BLOCK_START}{packed}</script>"
    )


def write_dashboard_html(data: dict[str, Any], path: str | Path) -> Path:
    """Write the feature dashboard for `data` (schema in the module docstring) to `path`, atomically.

    One self-contained HTML file: inline CSS and JS, the data inlined (gzip + base64), and a CSP that
    forbids every network request. The page opens on the feature in the URL hash (`page.html#feature=123`),
    else on the first feature; `#prompt` opens the prompt view when the data has a prompt.
    Returns the path written. Raises `SAELensError` when `data` does not follow the schema.
    """
    packed = _pack(encode_dashboard_payload(data))
    page = html_page(
        data["title"],
        _body(data["title"], packed),
        styles=[read_asset("common.css"), read_asset("dashboard.css")],
        scripts=[read_asset("dashboard.js")],
    )
    return atomic_write_text(path, page)


# -- the prompt-centric view as text -------------------------------------------------------------


def _display_width(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK) characters count 2, combining marks 0."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _pad(text: str, width: int, right: bool = False) -> str:
    fill = " " * max(0, width - _display_width(text))
    return fill + text if right else text + fill


def _show_token(token: str) -> str:
    # JSON quoting makes leading spaces visible and turns newlines and tabs into \n and \t, so one token
    # is always one line and its boundaries are unambiguous.
    return json.dumps(token, ensure_ascii=False)


def render_prompt_text(prompt: dict[str, Any], max_features: int = 5) -> str:
    """The prompt-centric view as a plain-text table, one row per token with its top features.

    `prompt` is the schema's prompt dict: {"text": str, "tokens": [str, ...],
    "top_features": [[[feature, value], ...], ...]} (one list per token, strongest first). Columns are
    aligned in terminal cells (wide characters count twice); a token with no active feature shows "–".
    """
    if not isinstance(prompt, dict) or not {"tokens", "top_features"} <= prompt.keys():
        raise SAELensError("prompt must be a dict with 'tokens' and 'top_features' (and usually 'text')")
    tokens, top = prompt["tokens"], prompt["top_features"]
    if len(tokens) != len(top):
        raise SAELensError(
            f"prompt: {len(tokens)} tokens but {len(top)} top_features lists; one list per token"
        )
    n_columns = min(max_features, max((len(per_token) for per_token in top), default=0))
    header = ["pos", "token"] + [f"feature {k + 1}" for k in range(n_columns)]
    rows = []
    for position, (token, per_token) in enumerate(zip(tokens, top, strict=True)):
        cells = [str(position), _show_token(str(token))]
        ranked = sorted(per_token, key=lambda pair: -float(pair[1]))[:n_columns]
        cells += [f"#{int(feature)} {float(value):.3g}" for feature, value in ranked]
        if not ranked and n_columns:
            cells.append("–")
        cells += [""] * (len(header) - len(cells))
        rows.append(cells)
    widths = [max(_display_width(row[c]) for row in [header, *rows]) for c in range(len(header))]
    separator = "  "

    def line(cells: list[str]) -> str:
        padded = [_pad(cells[0], widths[0], right=True)] + [
            _pad(c, w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return separator.join(padded).rstrip()

    out = []
    if prompt.get("text") is not None:
        out.append(f"Prompt: {_show_token(str(prompt['text']))}")
        out.append("")
    out.append(line(header))
    out.append(separator.join("-" * w for w in widths))
    out.extend(line(row) for row in rows)
    return "\n".join(out) + "\n"
