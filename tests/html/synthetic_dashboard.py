"""Synthetic dashboard data in the `sae_lens.html.dashboard` schema, realistic in shape and size.

Tokens follow a Zipf law over a word-like vocabulary (random, so they compress worse than real text:
the measured page sizes are an upper bound), activations are sparse with one peak per context, each
feature prefers a few tokens, densities are log-uniform between 1e-5 and 0.05.

Run as a script to time the 6,144-feature page: `python tests/html/synthetic_dashboard.py [n_features] [out.html]`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 300  # the browser tests' page: "a few hundred features"

_STEMS = tuple(
    [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "it",
        "his",
        "an",
        "were",
        "are",
        "which",
        "this",
        "be",
        "or",
        "has",
        "had",
        "not",
        "but",
        "first",
        "one",
        "their",
        "its",
        "new",
        "after",
        "who",
        "they",
        "have",
        "her",
        "she",
        "two",
        "been",
        "other",
        "when",
        "there",
        "all",
        "during",
        "into",
        "school",
        "time",
        "may",
        "years",
        "more",
        "most",
        "only",
        "over",
        "city",
        "some",
        "world",
        "would",
        "where",
        "later",
        "up",
        "such",
        "used",
        "many",
        "can",
        "state",
        "about",
        "national",
        "out",
        "known",
        "university",
        "united",
        "then",
        "made",
        "season",
        "team",
        "game",
        "music",
        "film",
        "war",
        "def",
        "return",
        "import",
        "self",
        "class",
        "print",
        "if",
        "else",
        "for",
        "while",
        "try",
        "except",
        "lambda",
        "yield",
        "async",
        "await",
        "none",
        "true",
    ]
)


def synthetic_vocab(size: int = 3000) -> list[str]:
    """Word-like tokens: ' word', 'word', '##ing'-style pieces, punctuation, a newline, a tab."""
    vocab = [" " + s for s in _STEMS] + list(_STEMS) + [".", ",", "(", ")", ":", "\n", "\t", " =", '"', "'s"]
    suffixes = ("ing", "ed", "s", "er", "ly", "ion", "al", "ness")
    i = 0
    while len(vocab) < size:
        stem = _STEMS[i % len(_STEMS)]
        vocab.append(
            f"{' ' if i % 3 else '##'}{stem}{suffixes[(i // len(_STEMS)) % len(suffixes)]}{i // 400 or ''}"
        )
        i += 1
    return vocab[:size]


def synthetic_dashboard_data(
    n_features: int = 300,
    *,
    d_sae: int | None = None,
    seed: int = 0,
    context_len: int = 24,
    n_top: int = 20,
    n_intervals: int = 10,
    per_interval: int = 5,
    hist_bins: int = 40,
    n_logits: int = 10,
    n_neighbours: int = 10,
    interval_kind: str = "quantile",
    logit_source: str | None = "W_U",
    with_prompt: bool = True,
    n_tokens: int = 2_000_000,
) -> dict[str, Any]:
    """A dashboard-data dict for features 0, 2, 4, ... (every other index, so some neighbours are absent)."""
    rng = np.random.default_rng(seed)
    vocab = synthetic_vocab()
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf /= zipf.sum()
    d_sae = d_sae or max(2 * n_features, 4 * n_neighbours)
    indices = list(range(0, 2 * n_features, 2))[:n_features]
    n_contexts = n_top + n_intervals * per_interval
    features = []
    for index in indices:
        preferred = rng.choice(len(vocab), size=4, replace=False)
        max_act = float(rng.lognormal(1.2, 0.5))
        density = float(10 ** rng.uniform(-5, math.log10(0.05)))
        tokens = rng.choice(len(vocab), size=(n_contexts, context_len), p=zipf)
        peak = rng.integers(context_len // 2, context_len, size=n_contexts)
        tokens[np.arange(n_contexts), peak] = rng.choice(preferred, size=n_contexts)
        # Sparse activations: a peak per context plus a few smaller neighbours, zero elsewhere.
        acts = np.zeros((n_contexts, context_len))
        top_peaks = np.sort(rng.uniform(0.6, 1.0, size=n_top))[::-1] * max_act
        top_peaks[0] = max_act
        edges_iv = (
            np.quantile(
                rng.exponential(max_act / 4, 4000).clip(0, max_act), np.linspace(0, 1, n_intervals + 1)
            )
            if interval_kind == "quantile"
            else np.linspace(0, max_act, n_intervals + 1)
        )
        iv_peaks = np.concatenate(
            [rng.uniform(edges_iv[k], edges_iv[k + 1], size=per_interval) for k in range(n_intervals)]
        )
        peaks = np.concatenate([top_peaks, iv_peaks])
        acts[np.arange(n_contexts), peak] = peaks
        extra = rng.random((n_contexts, context_len)) < 0.12
        acts = np.where(extra & (acts == 0), rng.uniform(0.02, 0.5, acts.shape) * peaks[:, None], acts)
        acts = np.minimum(acts, peaks[:, None])
        token_strings = [[vocab[t] for t in row] for row in tokens.tolist()]
        act_lists = acts.tolist()
        contexts = [{"tokens": t, "acts": a} for t, a in zip(token_strings, act_lists, strict=True)]
        counts = (rng.exponential(1.0, hist_bins) * np.exp(-np.linspace(0, 5, hist_bins)) * 2000).astype(int)
        hist_edges = np.linspace(0, max_act, hist_bins + 1)
        logit_ids = rng.choice(len(vocab), size=2 * n_logits, replace=False)
        logit_values = np.sort(rng.normal(0, 1, 2 * n_logits))[::-1]
        others = rng.choice(d_sae, size=2 * n_neighbours, replace=False)
        others = others[others != index][: 2 * n_neighbours - 1]
        features.append(
            {
                "index": index,
                "density": density,
                "max_act": max_act,
                "mean_act": float(max_act * rng.uniform(0.15, 0.4)),
                "top_examples": contexts[:n_top],
                "intervals": [
                    {
                        "low": float(edges_iv[k]),
                        "high": float(edges_iv[k + 1]),
                        "examples": contexts[n_top + k * per_interval : n_top + (k + 1) * per_interval],
                    }
                    for k in range(n_intervals)
                ],
                "histogram": {"edges": hist_edges.tolist(), "counts": counts.tolist()},
                "logits": None
                if logit_source is None
                else {
                    "top": [
                        [vocab[t], float(v)]
                        for t, v in zip(logit_ids[:n_logits], logit_values[:n_logits], strict=True)
                    ],
                    "bottom": [
                        [vocab[t], float(v)]
                        for t, v in zip(logit_ids[n_logits:], logit_values[::-1][:n_logits], strict=True)
                    ],
                },
                "nearest": [
                    [int(j), float(c)]
                    for j, c in zip(
                        others[:n_neighbours], np.sort(rng.uniform(0.1, 0.7, n_neighbours))[::-1], strict=True
                    )
                ],
                "correlated": [
                    [int(j), float(c)]
                    for j, c in zip(
                        others[n_neighbours:],
                        np.sort(rng.uniform(-0.2, 0.9, n_neighbours - 1))[::-1],
                        strict=True,
                    )
                ],
            }
        )
    prompt = None
    if with_prompt:
        words = [" The", " cat", " sat", " on", " the", " mat", ".", "\n", "def", " main", "():"]
        prompt = {
            "text": "".join(words),
            "tokens": words,
            "top_features": [
                [
                    [indices[(7 * p + k) % len(indices)], round(3.0 / (k + 1) + 0.1 * p, 3)]
                    for k in range(p % 4)
                ]
                for p in range(len(words))
            ],
        }
    return {
        "title": "Synthetic SAE dashboard",
        "sae": {
            "name": "topk-synthetic",
            "architecture": "topk",
            "d_in": 384,
            "d_sae": d_sae,
            "model_name": "synthetic-model",
            "hook_name": "blocks.3.hook_resid_post",
        },
        "n_tokens": n_tokens,
        "interval_kind": interval_kind,
        "logit_source": logit_source,
        "features": features,
        "prompt": prompt,
    }


def main() -> None:
    from sae_lens.html import write_dashboard_html

    n_features = int(sys.argv[1]) if len(sys.argv) > 1 else 6144
    out = Path(sys.argv[2] if len(sys.argv) > 2 else f"/tmp/dashboard_{n_features}.html")
    started = time.perf_counter()
    data = synthetic_dashboard_data(n_features, d_sae=max(2 * n_features, 6144))
    generated = time.perf_counter()
    write_dashboard_html(data, out)
    written = time.perf_counter()
    size = out.stat().st_size
    print(
        f"{n_features} features: generated in {generated - started:.1f} s, written in {written - generated:.2f} s, "
        f"{size / 1e6:.2f} MB ({size / n_features / 1e3:.2f} kB per feature) -> {out}"
    )


if __name__ == "__main__":
    main()
