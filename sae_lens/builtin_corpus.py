"""The embedded ``builtin:python-docs`` corpus: English text that ships with CPython.

The corpus is the text of ``pydoc_data.topics.topics`` (the language reference topics
that ``help()`` shows) plus the docstrings of the standard library, one document per
topic and one per module. Nothing is downloaded, so it works offline and in tests.

Building it means importing a few hundred stdlib modules. That happens in a child
interpreter (this file run as a script) rather than in the caller's process: some
modules change global state when imported (``rlcompleter`` installs a readline
completer, ``logging`` registers atexit hooks, deprecated modules touch the warnings
filters) and leaving ~600 extra modules in ``sys.modules`` would slow and surprise the
caller. The child runs with ``-I -S`` so only the standard library is importable and
nothing from the environment (site-packages, PYTHON* variables, the current directory)
can change the result. The built corpus is cached with ``Dataset.save_to_disk`` and
loaded memory-mapped afterwards.

This module only imports the standard library at top level because the child
interpreter has no site-packages; ``datasets`` is imported where it is used.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

CORPUS_NAME = "builtin:python-docs"

# Bump when the extraction rules change so that caches built by older code are rebuilt.
_CORPUS_VERSION = 1
_MARKER_FILE = "sae_lens_corpus.json"
_BUILD_TIMEOUT_S = 300

# Top-level modules never imported: they open windows or browsers, print on import,
# write files into the Python installation (lib2to3 regenerates grammar pickles), are
# test suites, or hold boilerplate rather than prose (encodings: one codec per module).
# pydoc_data is read directly for its topics.
_SKIPPED_MODULES = frozenset(
    {
        "antigravity",
        "encodings",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "test",
        "this",
        "tkinter",
    }
)

# Methods whose docstrings are usually specific to the class; other dunders mostly
# repeat generic text such as "Return self==value.".
_DOCUMENTED_DUNDERS = frozenset({"__init__", "__call__"})


def cache_root() -> Path:
    """Return the sae_lens cache folder: ``$SAE_LENS_CACHE`` or ``~/.cache/sae_lens``."""
    configured = os.environ.get("SAE_LENS_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sae_lens"


def python_docs_cache_dir() -> Path:
    """Return the folder that holds the cached corpus for the running Python version."""
    version = ".".join(str(part) for part in sys.version_info[:3])
    return cache_root() / "builtin" / f"python-docs-{version}"


def python_docs_dataset() -> datasets.Dataset:
    """Return the ``builtin:python-docs`` corpus as a Dataset with a single ``text`` column.

    The first call on a given Python version builds the corpus (about a second) and saves
    it under :func:`python_docs_cache_dir`; later calls load the saved copy.
    """
    import datasets

    cache_dir = python_docs_cache_dir()
    if not _is_complete(cache_dir):
        _build_into(cache_dir)
    return datasets.load_from_disk(str(cache_dir))


def build_python_docs_texts() -> list[str]:
    """Extract the corpus documents in a child interpreter and return them in order."""
    with tempfile.TemporaryDirectory(prefix="sae_lens_python_docs_") as tmp:
        out_path = Path(tmp) / "documents.json"
        command = [sys.executable, "-I", "-S", __file__, str(out_path)]
        # stdout is discarded because importing some modules writes to the terminal
        # (readline may emit escape codes); the result comes back through out_path.
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0 or not out_path.exists():
            stderr_tail = result.stderr.strip().splitlines()[-5:]
            raise RuntimeError(
                f"building {CORPUS_NAME} failed (exit code {result.returncode}): " + " | ".join(stderr_tail)
            )
        documents = json.loads(out_path.read_text(encoding="utf-8"))
    return [text for _name, text in documents]


def _is_complete(cache_dir: Path) -> bool:
    marker = cache_dir / _MARKER_FILE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("corpus_version") == _CORPUS_VERSION


def _build_into(cache_dir: Path) -> None:
    import datasets

    texts = build_python_docs_texts()
    dataset = datasets.Dataset.from_dict({"text": texts})
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # Save next to the destination and rename it into place, so that a reader (or a
    # concurrent build, e.g. parallel test workers) never sees a half-written corpus.
    staging = cache_dir.parent / f".{cache_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        dataset.save_to_disk(str(staging))
        info = {
            "corpus_version": _CORPUS_VERSION,
            "python": sys.version,
            "documents": len(texts),
            "characters": sum(len(text) for text in texts),
        }
        (staging / _MARKER_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if cache_dir.exists() and not _is_complete(cache_dir):
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            staging.rename(cache_dir)
        except OSError:
            # Another process finished first; its corpus is identical, keep it.
            if not _is_complete(cache_dir):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- Extraction, run inside the child interpreter -------------------------------------


def _is_skipped(module_name: str) -> bool:
    parts = module_name.split(".")
    if parts[0] in _SKIPPED_MODULES or parts[0].startswith("turtle"):
        return True
    return any(part.startswith("_") or part in ("test", "tests") for part in parts)


def _import_stdlib_modules() -> dict[str, object]:
    """Import every public stdlib module and submodule that imports cleanly."""
    modules: dict[str, object] = {}
    pending = sorted(name for name in sys.stdlib_module_names if not _is_skipped(name))
    while pending:
        name = pending.pop()
        try:
            module = importlib.import_module(name)
        except Exception:
            # Any failure (ImportError for winreg/msvcrt or C extensions that were not
            # built, OSError or RuntimeError from platform checks) only means the module
            # is unavailable here and contributes nothing.
            continue
        modules[name] = module
        package_path = getattr(module, "__path__", None)
        if package_path is not None:
            for info in pkgutil.iter_modules(package_path, prefix=f"{name}."):
                if not _is_skipped(info.name):
                    pending.append(info.name)
    return modules


def _clean_docstring(doc: object) -> str | None:
    if not isinstance(doc, str):
        return None
    return inspect.cleandoc(doc).strip() or None


def _is_defined_in(obj: object, module_name: str) -> bool:
    # Keep objects the module defines, plus those of its private C accelerator (heapq's
    # functions live in _heapq), which is never visited itself; this skips re-exports.
    owner = getattr(obj, "__module__", None) or ""
    return owner == module_name or owner.startswith("_")


def _public_docstrings(module_name: str, module: object) -> list[str | None]:
    docs: list[str | None] = [getattr(module, "__doc__", None)]
    namespace = vars(module)
    for attr in sorted(namespace):
        obj = namespace[attr]
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _is_defined_in(obj, module_name):
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            members = vars(obj)
            for member_name in sorted(members):
                if member_name.startswith("_") and member_name not in _DOCUMENTED_DUNDERS:
                    continue
                member = members[member_name]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property) or inspect.isroutine(member):
                    docs.append(member.__doc__)
    return docs


def _extract_documents() -> list[tuple[str, str]]:
    """Return (name, text) pairs: pydoc topics first, then modules, each sorted by name."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    documents: list[tuple[str, str]] = []
    for topic in sorted(topics):
        text = topics[topic].strip()
        if text and text not in seen:
            seen.add(text)
            documents.append((f"topic:{topic}", text))

    modules = _import_stdlib_modules()
    for name in sorted(modules):
        paragraphs = []
        for doc in _public_docstrings(name, modules[name]):
            cleaned = _clean_docstring(doc)
            # Inherited and re-exported docstrings appear many times; keep the first,
            # which is well defined because modules are visited in sorted order.
            if cleaned and cleaned not in seen:
                seen.add(cleaned)
                paragraphs.append(cleaned)
        if paragraphs:
            documents.append((f"module:{name}", "\n\n".join(paragraphs)))
    return documents


def _main(out_path: str) -> None:
    warnings.simplefilter("ignore")
    with contextlib.redirect_stdout(io.StringIO()):
        documents = _extract_documents()
    Path(out_path).write_text(json.dumps(documents), encoding="utf-8")


if __name__ == "__main__":
    _main(sys.argv[1])
