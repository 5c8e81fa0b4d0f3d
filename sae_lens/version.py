"""The library's version (one place; the package, checkpoints and caches read it)."""

__version__ = "0.1.0"
