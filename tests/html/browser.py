"""A real headless Chromium for the page tests, driven through Playwright (no `playwright install`).

`launch_browser()` starts the system Chromium (`/usr/bin/chromium`, or `SAE_LENS_CHROMIUM`) with the
offline flags below; Playwright gives every launch a fresh, temporary profile directory (its own
`--user-data-dir`). `Browser.open(path)` loads a page in a fresh browser context and records what a
test must see to call the page clean: console messages, uncaught page errors, every request the page
made, and every Content-Security-Policy violation (via a `securitypolicyviolation` listener added
before the page's own scripts run). Non-file requests are aborted, so a buggy page cannot reach the
network even in a test.

`decode_png` is a small pure-Python PNG decoder (zlib + the five scanline filters) for checking that
a screenshot is not blank.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
_CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push({directive: e.violatedDirective, blocked: e.blockedURI});
});
"""


class BrowserUnavailable(RuntimeError):
    """Chromium or Playwright is missing or does not start; the message says which and how to fix it."""


def find_chromium() -> str | None:
    """The Chromium executable to use: $SAE_LENS_CHROMIUM, else the first system install found."""
    configured = os.environ.get("SAE_LENS_CHROMIUM")
    if configured:
        return configured if Path(configured).exists() else None
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    found = shutil.which("chromium")
    return found


@dataclass
class PageRecord:
    """What one page did while a test drove it."""

    url: str
    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    page: Any = None

    def errors(self) -> list[str]:
        """Console errors and warnings (a CSP refusal is logged as an error) plus uncaught exceptions."""
        return [f"console.{kind}: {text}" for kind, text in self.console if kind in ("error", "warning")] + [
            f"pageerror: {error}" for error in self.page_errors
        ]

    def csp_violations(self) -> list[dict[str, str]]:
        return self.page.evaluate("window.__cspViolations || []")

    def network_requests(self) -> list[str]:
        """Requests other than the page's own file:// document."""
        own = self.url.split("#", 1)[0]
        return [url for url in self.requests if url.split("#", 1)[0] != own]


class Browser:
    """One launched Chromium; `open` gives each test its own context (no shared history or storage)."""

    def __init__(self, playwright: Any, browser: Any, executable: str) -> None:
        self.playwright = playwright
        self.browser = browser
        self.executable = executable

    @contextmanager
    def open(
        self,
        path: str | Path,
        fragment: str = "",
        *,
        width: int = 1280,
        height: int = 800,
        ready: str | None = None,
    ) -> Iterator[PageRecord]:
        """Load `path` (+ `#fragment`) and yield its `PageRecord`; `ready` is a selector to wait for."""
        url = Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")
        context = self.browser.new_context(viewport={"width": width, "height": height})
        # Belt and braces: whatever the CSP does, nothing but the file itself may load in a test.
        context.route(re.compile(r"^(?!file:).*"), lambda route: route.abort())
        context.add_init_script(_CSP_LISTENER)
        page = context.new_page()
        record = PageRecord(url=url, page=page)
        page.on("console", lambda message: record.console.append((message.type, message.text)))
        page.on("pageerror", lambda error: record.page_errors.append(str(error)))
        page.on("request", lambda request: record.requests.append(request.url))
        try:
            page.goto(url)
            if ready:
                page.wait_for_selector(ready, timeout=30_000)
            yield record
        finally:
            context.close()

    def close(self) -> None:
        self.browser.close()
        self.playwright.stop()


def launch_browser() -> Browser:
    """Start headless Chromium; raises `BrowserUnavailable` with the reason when it cannot."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise BrowserUnavailable(
            f"the playwright package is not installed (pip install playwright): {error}"
        ) from error
    executable = find_chromium()
    if executable is None:
        raise BrowserUnavailable(
            "no Chromium found at " + ", ".join(CHROMIUM_CANDIDATES) + " (apt-get install -y chromium, "
            "or set SAE_LENS_CHROMIUM)"
        )
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=LAUNCH_ARGS)
    except PlaywrightError as error:
        playwright.stop()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise BrowserUnavailable(f"Chromium at {executable} did not start: {first_line}") from error
    return Browser(playwright, browser, executable)


# -- PNG decoding ---------------------------------------------------------------------------------


def _unfilter_paeth(line: bytearray, previous: bytearray, channels: int) -> None:
    # The first pixel has no left or upper-left neighbour: its predictor is the byte above.
    for i in range(channels):
        line[i] = (line[i] + previous[i]) & 0xFF
    for i in range(channels, len(line)):
        a, b, c = line[i - channels], previous[i], previous[i - channels]
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, pixels) of an 8-bit greyscale/RGB/RGBA, non-interlaced PNG.

    `pixels` is row-major, `channels` bytes per pixel. Enough for browser screenshots. The None, Sub and
    Up filters are undone with numpy's wrapping uint8 arithmetic; Average and Paeth depend on the
    pixel just decoded to their left, so they run byte by byte.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    offset, idat, header = 8, [], None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError(f"PNG data holds {len(raw)} bytes, expected {height * (stride + 1)}")
    out = np.empty((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for row in range(height):
        start = row * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1)
        if kind == 0:
            current = line.copy()
        elif kind == 1:  # Sub: a running sum along each channel, modulo 256
            current = line.reshape(width, channels).cumsum(axis=0, dtype=np.uint8).reshape(stride)
        elif kind == 2:  # Up
            current = line + previous
        elif kind == 3:  # Average
            buffer, above = bytearray(line.tobytes()), previous.tobytes()
            for i in range(stride):
                left = buffer[i - channels] if i >= channels else 0
                buffer[i] = (buffer[i] + ((left + above[i]) >> 1)) & 0xFF
            current = np.frombuffer(bytes(buffer), dtype=np.uint8)
        elif kind == 4:  # Paeth
            buffer = bytearray(line.tobytes())
            _unfilter_paeth(buffer, bytearray(previous.tobytes()), channels)
            current = np.frombuffer(bytes(buffer), dtype=np.uint8)
        else:
            raise ValueError(f"bad PNG filter type {kind} in row {row}")
        out[row] = current
        previous = current
    return width, height, channels, out.tobytes()


def luminance_stats(png: bytes, sample_every: int = 3) -> tuple[float, float, int]:
    """(mean, variance, number of distinct colours) of the pixel brightness over every n-th pixel of a PNG.

    A blank page is one flat colour: variance 0 and one colour.
    """
    width, height, channels, pixels = decode_png(png)
    rgb = np.frombuffer(pixels, dtype=np.uint8).reshape(width * height, channels)[
        ::sample_every, : min(channels, 3)
    ]
    brightness = rgb.astype(np.float64).mean(axis=1)
    packed = rgb.astype(np.uint32) @ (np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)[: rgb.shape[1]])
    return float(brightness.mean()), float(brightness.var()), int(np.unique(packed).size)
