"""The shell every generated page shares: a strict offline Content-Security-Policy, inline assets, atomic writes.

The CSP allows exactly the inline `<style>` and `<script>` blocks of the page, by their SHA-256
hashes, and nothing else: `default-src 'none'` blocks every fetch, image, font, frame and
connection (`img-src data:` lets a `data:` image through). An accidental request anywhere in the
page is then refused by the browser and reported in its console, instead of silently leaving the
machine. Data blocks (`<script type="application/json">`) are not executed, so they need no hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import tempfile
from importlib import resources
from pathlib import Path


def read_asset(name: str) -> str:
    """The text of `sae_lens/html/assets/<name>` (shipped as package data)."""
    return resources.files("sae_lens.html").joinpath("assets", name).read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(styles: list[str], scripts: list[str]) -> str:
    """The CSP that allows exactly these inline style and script bodies, and no network access."""
    style_src = " ".join(_sha256_source(s) for s in styles) or "'none'"
    script_src = " ".join(_sha256_source(s) for s in scripts) or "'none'"
    return (
        "default-src 'none'; "
        f"style-src {style_src}; "
        f"script-src {script_src}; "
        "img-src data:; "
        "base-uri 'none'; form-action 'none'"
    )


def html_page(title: str, body: str, *, styles: list[str], scripts: list[str] | None = None) -> str:
    """A complete HTML document: CSP first in <head> (it only governs what follows it), then assets, then `body`.

    `body` is trusted HTML built by this package; `title` is escaped here.
    """
    scripts = scripts or []
    for text in scripts:
        if "</script" in text.lower():
            raise ValueError("an inline script may not contain '</script'")
    for text in styles:
        if "</style" in text.lower():
            raise ValueError("an inline style may not contain '</style'")
    csp = content_security_policy(styles, scripts)
    head = [
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{html.escape(title)}</title>",
        *(f"<style>{text}</style>" for text in styles),
    ]
    # Scripts go last in <body>, after the data block they read.
    tail = "".join(f"<script>{text}</script>" for text in scripts)
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{"".join(head)}\n</head>\n<body>\n{body}\n{tail}\n</body>\n</html>\n'


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same folder and `os.replace`.

    A reader (or a browser reloading the page) sees either the old file or the new one, never half a file;
    a crash mid-write leaves no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; a report is meant to be shared like any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
