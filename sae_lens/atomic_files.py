"""Writing files so that a crash never leaves one that looks complete but is truncated.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target: a rename within one file system is atomic, so readers see the old file or the whole new
one. Folders (checkpoints) are built under a temporary name and renamed the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Save `tensors` as a safetensors file, atomically."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    return atomic_write_bytes(path, save(contiguous))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to `path` when the block succeeds.

    An existing folder at `path` is replaced only after the new one is complete. If the block
    fails, the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield building
        _fsync_folder(building)
        if path.exists():
            retired = path.with_name(f".{path.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(path, retired)
            os.replace(building, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(building, path)
        _fsync_folder(path.parent)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _fsync_folder(folder: Path) -> None:
    # Makes the renames and new entries durable; some file systems refuse fsync on folders.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def ensure_writable_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` if needed and prove a file can be written there, before any expensive work.

    Raises SAELensError naming `what` and the reason (read-only file system, no permission, ...).
    """
    from sae_lens.errors import SAELensError

    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SAELensError(
            f"{what} {str(path)!r} cannot be written ({reason}); choose a folder you can write to"
        ) from None
    return folder
