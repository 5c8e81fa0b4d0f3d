"""The test helper's PNG decoder against images encoded here with every scanline filter."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from browser import decode_png, luminance_stats


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _encode(rows: list[bytes], width: int, channels: int, filters: list[int]) -> bytes:
    """A PNG whose row i is written with filter filters[i] (the encoder side of the five filters)."""
    colour = {1: 0, 3: 2, 4: 6}[channels]
    stride = width * channels
    previous = bytes(stride)
    raw = bytearray()
    for row, kind in zip(rows, filters, strict=True):
        out = bytearray()
        for i in range(stride):
            a = row[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            predictor = [0, a, b, (a + b) >> 1, _paeth(a, b, c)][kind]
            out.append((row[i] - predictor) & 0xFF)
        raw += bytes([kind]) + out
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, len(rows), 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_every_filter_round_trips(channels: int) -> None:
    rng = random.Random(channels)
    width, height = 7, 15
    rows = [bytes(rng.randrange(256) for _ in range(width * channels)) for _ in range(height)]
    filters = [k % 5 for k in range(height)]  # 0..4 three times, each after every other filter
    w, h, c, pixels = decode_png(_encode(rows, width, channels, filters))
    assert (w, h, c) == (width, height, channels)
    assert pixels == b"".join(rows)


def test_blank_and_busy_images() -> None:
    blank = _encode([bytes([250, 250, 250] * 20)] * 10, 20, 3, [0, 1, 2, 3, 4] * 2)
    mean, variance, colours = luminance_stats(blank, sample_every=1)
    assert (mean, variance, colours) == (250.0, 0.0, 1)
    halves = _encode([bytes([0, 0, 0] * 10 + [255, 255, 255] * 10)] * 4, 20, 3, [4, 2, 1, 3])
    mean, variance, colours = luminance_stats(halves, sample_every=1)
    assert mean == pytest.approx(127.5) and variance == pytest.approx(127.5**2) and colours == 2


def test_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"GIF89a")
