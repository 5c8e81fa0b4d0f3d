"""Dashboard writing without a browser: the payload round trip, validation errors, CSP, atomic writes,
and the plain-text prompt table."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from synthetic_dashboard import synthetic_dashboard_data

from sae_lens.errors import SAELensError
from sae_lens.html import render_prompt_text, write_dashboard_html
from sae_lens.html.dashboard import (
    ACT_LEVELS,
    _display_width,
    decode_dashboard_payload,
    encode_dashboard_payload,
    read_dashboard_data,
)


def must_search(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    match = re.search(pattern, text, flags)
    assert match is not None, f"{pattern!r} not found"
    return match


@pytest.fixture(scope="module")
def small_data() -> dict[str, Any]:
    return synthetic_dashboard_data(12, seed=3)


def test_round_trip_keeps_tokens_exactly_and_acts_to_the_quantisation_step(
    small_data: dict[str, Any], tmp_path: Path
) -> None:
    path = write_dashboard_html(small_data, tmp_path / "d.html")
    back = read_dashboard_data(path)
    assert back["title"] == small_data["title"] and back["interval_kind"] == "quantile"
    assert back["sae"] == small_data["sae"] and back["n_tokens"] == small_data["n_tokens"]
    assert [f["index"] for f in back["features"]] == [f["index"] for f in small_data["features"]]
    for original, decoded in zip(small_data["features"], back["features"], strict=True):
        examples = original["top_examples"] + [e for iv in original["intervals"] for e in iv["examples"]]
        decoded_examples = decoded["top_examples"] + [
            e for iv in decoded["intervals"] for e in iv["examples"]
        ]
        scale = max(abs(a) for e in examples for a in e["acts"])
        for a, b in zip(examples, decoded_examples, strict=True):
            assert a["tokens"] == b["tokens"]
            # int16 quantisation: error at most half a step of scale / 32767 (plus float32 rounding).
            assert (
                max(abs(x - y) for x, y in zip(a["acts"], b["acts"], strict=True))
                <= scale / ACT_LEVELS * 0.5 + 1e-6 * scale
            )
        # Scalars are rounded to 3 significant digits, histogram edges to 4.
        assert decoded["max_act"] == pytest.approx(original["max_act"], rel=5e-3)
        assert decoded["density"] == pytest.approx(original["density"], rel=5e-3)
        assert decoded["histogram"]["counts"] == original["histogram"]["counts"]
        assert decoded["histogram"]["edges"] == pytest.approx(
            original["histogram"]["edges"], rel=5e-4, abs=1e-12
        )
        assert [p[0] for p in decoded["nearest"]] == [p[0] for p in original["nearest"]]
        assert [p[0] for p in decoded["logits"]["top"]] == [p[0] for p in original["logits"]["top"]]
        assert [i["low"] for i in decoded["intervals"]] == pytest.approx(
            [i["low"] for i in original["intervals"]], rel=5e-3
        )
    assert back["prompt"]["tokens"] == small_data["prompt"]["tokens"]


def test_vocabulary_is_shared_and_most_frequent_first() -> None:
    data = synthetic_dashboard_data(2, seed=0, with_prompt=False)
    for feature in data["features"]:
        feature["top_examples"] = [{"tokens": ["a", "b", "a", "c", "a", "b"], "acts": [0, 1, 0, 2, 0, 0]}]
        feature["intervals"] = []
        feature["logits"] = {"top": [["z", 1.0]], "bottom": [["a", -1.0]]}
    payload = encode_dashboard_payload(data)
    header_end = 4 + int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4:header_end])
    assert header["vocab"] == ["a", "b", "c", "z"]  # a ×6, b ×4, c ×2 in contexts; z only in logits
    assert header["id_bytes"] == 2 and header["n_context_tokens"] == 12
    back = decode_dashboard_payload(payload)
    assert back["features"][1]["top_examples"][0]["tokens"] == ["a", "b", "a", "c", "a", "b"]
    assert back["features"][0]["logits"]["top"][0][0] == "z"


def test_negative_and_all_zero_activations_survive(tmp_path: Path) -> None:
    data = synthetic_dashboard_data(2, seed=0, with_prompt=False)
    data["features"][0]["top_examples"] = [{"tokens": ["x", "y"], "acts": [-2.0, 4.0]}]
    data["features"][0]["intervals"] = []
    data["features"][1]["top_examples"] = [{"tokens": ["x", "y"], "acts": [0.0, 0.0]}]
    data["features"][1]["intervals"] = []
    back = read_dashboard_data(write_dashboard_html(data, tmp_path / "d.html"))
    assert back["features"][0]["top_examples"][0]["acts"] == pytest.approx([-2.0, 4.0], abs=1e-4)
    assert back["features"][1]["top_examples"][0]["acts"] == [0.0, 0.0]


def _broken(change: Any) -> dict[str, Any]:
    data = synthetic_dashboard_data(3, seed=0, d_sae=64)
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["features"][1]["top_examples"][2]["acts"].pop(),
            r"features\[1\] \(feature 2\)\.top_examples\[2\]: 24 tokens but 23 acts",
        ),
        (
            lambda d: d.update(interval_kind="quantiles"),
            r"interval_kind: 'quantiles' is not one of \['quantile', 'equal_width'\]",
        ),
        (lambda d: d.update(logit_source="W_E"), r"logit_source: 'W_E' is not one of"),
        (
            lambda d: d["features"][2].update(index=2),
            r"features\[2\]\.index: feature 2 appears more than once",
        ),
        (
            lambda d: d["features"][0].update(index=600),
            r"features\[0\]\.index: 600 is outside 0\.\.63 \(d_sae=64\)",
        ),
        (
            lambda d: d["features"][0]["nearest"].append([9999, 0.5]),
            r"nearest\[\d+\]\[0\]: feature index 9999 is outside",
        ),
        (
            lambda d: d["features"][0]["top_examples"][0]["acts"].__setitem__(3, float("nan")),
            r"features\[0\] \(context 0 of that feature.*non-finite",
        ),
        (
            lambda d: d["features"][0]["top_examples"][0]["acts"].__setitem__(3, "big"),
            r"acts must be numbers, got 'big'",
        ),
        (
            lambda d: d["features"][0]["top_examples"][0]["tokens"].__setitem__(0, 50256),
            r"tokens must be decoded strings, got int 50256",
        ),
        (lambda d: d["features"][1].pop("histogram"), r"features\[1\]: missing keys \['histogram'\]"),
        (
            lambda d: d["features"][1]["histogram"]["counts"].pop(),
            r"needs len\(edges\) == len\(counts\) \+ 1; got 41 edges and 39 counts",
        ),
        (lambda d: d["features"][1].update(density=1.5), r"density: 1\.5 is not a fraction in \[0, 1\]"),
        (
            lambda d: d["features"][1]["intervals"][0].update(low=9.0, high=1.0),
            r"intervals\[0\]: low 9\.0 is above high 1\.0",
        ),
        (lambda d: d["sae"].pop("hook_name"), r"sae: missing keys \['hook_name'\]"),
        (lambda d: d["prompt"]["top_features"].pop(), r"prompt: 11 tokens but 10 top_features lists"),
        (lambda d: d["features"][0].update(max_act=float("inf")), r"max_act: expected a finite number"),
    ],
)
def test_schema_errors_name_the_field(change: Any, message: str, tmp_path: Path) -> None:
    data = _broken(change)
    with pytest.raises(SAELensError, match=message) as caught:
        write_dashboard_html(data, tmp_path / "d.html")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("dashboard data: ")
    assert not (tmp_path / "d.html").exists()


def test_failed_write_keeps_the_old_page_and_leaves_no_temporary(
    small_data: dict[str, Any], tmp_path: Path
) -> None:
    path = write_dashboard_html(small_data, tmp_path / "d.html")
    before = path.read_bytes()
    bad = copy.deepcopy(small_data)
    bad["features"][0]["top_examples"][0]["acts"] = []
    with pytest.raises(SAELensError):
        write_dashboard_html(bad, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d.html"]


def test_atomic_replace_and_reproducible_output(small_data: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "nested" / "d.html"
    first = write_dashboard_html(small_data, path).read_bytes()
    inode = path.stat().st_ino
    second = write_dashboard_html(small_data, path).read_bytes()
    assert first == second  # gzip with mtime=0: same data, same bytes
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(os.listdir(path.parent)) == ["d.html"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_csp_allows_exactly_the_inline_assets_and_nothing_remote(
    small_data: dict[str, Any], tmp_path: Path
) -> None:
    page = write_dashboard_html(small_data, tmp_path / "d.html").read_text()
    csp = must_search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    csp = csp.replace("&#x27;", "'")
    assert csp.startswith("default-src 'none'; ") and "img-src data:" in csp and "unsafe-inline" not in csp
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, flags=re.S)
    assert len(scripts) == 1 and len(styles) == 2
    script_src = must_search(r"script-src ([^;]+)", csp).group(1).split()
    style_src = must_search(r"style-src ([^;]+)", csp).group(1).split()
    assert script_src == [_sha(s) for s in scripts] and style_src == [_sha(s) for s in styles]
    # The CSP must come before anything it governs.
    assert page.index("Content-Security-Policy") < page.index("<style>")
    # The only URL in the page is the SVG namespace, which is an identifier, not a request.
    assert set(re.findall(r"https?://[^\s\"')]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert ' style="' not in page  # inline style attributes would be blocked by this CSP


def test_no_features_and_no_prompt_still_write(tmp_path: Path) -> None:
    data = synthetic_dashboard_data(1, seed=0, with_prompt=False, logit_source=None)
    data["features"] = []
    back = read_dashboard_data(write_dashboard_html(data, tmp_path / "d.html"))
    assert back["features"] == [] and back["prompt"] is None


def test_read_dashboard_data_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "x.html"
    other.write_text("<html></html>")
    with pytest.raises(SAELensError, match="not a dashboard page"):
        read_dashboard_data(other)


# -- render_prompt_text ---------------------------------------------------------------------------


def test_prompt_text_table_by_hand() -> None:
    prompt = {
        "text": "The cat\n",
        "tokens": ["The", " cat", "\n"],
        "top_features": [[[12, 3.14159], [7, 0.5]], [[1024, 12.5]], []],
    }
    assert render_prompt_text(prompt) == (
        'Prompt: "The cat\\n"\n'
        "\n"
        "pos  token   feature 1   feature 2\n"
        "---  ------  ----------  ---------\n"
        '  0  "The"   #12 3.14    #7 0.5\n'
        '  1  " cat"  #1024 12.5\n'
        '  2  "\\n"    –\n'
    )


def test_prompt_text_orders_by_value_and_caps_columns() -> None:
    prompt = {"text": "a", "tokens": ["a"], "top_features": [[[1, 0.1], [2, 0.9], [3, 0.5], [4, 0.7]]]}
    last = render_prompt_text(prompt, max_features=2).splitlines()[-1]
    assert last.split() == ["0", '"a"', "#2", "0.9", "#4", "0.7"]


def test_prompt_text_aligns_wide_characters() -> None:
    prompt = {"text": "日本 x", "tokens": ["日本", " x"], "top_features": [[[5, 1.0]], [[6, 2.0]]]}
    lines = render_prompt_text(prompt).splitlines()[2:]
    # The feature column starts at the same terminal cell on every line, CJK counting two cells each.
    starts = [_display_width(line.split("#")[0]) for line in lines if "#" in line]
    assert len(set(starts)) == 1 and len(starts) == 2
    assert _display_width("日本") == 4


def test_prompt_text_errors() -> None:
    with pytest.raises(SAELensError, match="2 tokens but 1 top_features"):
        render_prompt_text({"text": "", "tokens": ["a", "b"], "top_features": [[]]})
