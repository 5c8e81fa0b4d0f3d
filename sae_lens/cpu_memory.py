"""Keep freed CPU memory for reuse while training, instead of handing it back to the OS each step.

PyTorch's CPU tensors come from the C library's `malloc`. With glibc's defaults every block of
128 KiB or more is a fresh `mmap`, unmapped again when the tensor dies, so each training step
page-faults its whole working set back in: about 140,000 faults (550 MB) per step for a 2-block
GPT-2 forward plus a TopK SAE step at 4096 tokens, a third of the step's time on a 2-core machine.
PyTorch's own CPU tuning guide recommends a caching allocator (jemalloc / tcmalloc) for this
reason; those need `LD_PRELOAD`, so we instead ask glibc (via `mallopt`) to serve large blocks from
its heap and to keep freed memory there. The next step reuses the same pages without faults.

The setting is process-wide. `SAETrainer.fit` holds it with `reusing_freed_memory` (the one place
it is decided: the architecture's default or `cpu_reuse_freed_memory`), which restores glibc's
defaults and returns the cached memory to the OS when training ends. Elsewhere (macOS, musl,
Windows) these calls do nothing and return False.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

__all__ = [
    "is_reusing_freed_memory",
    "release_freed_memory",
    "restore_default_allocator",
    "reuse_freed_memory",
    "reusing_freed_memory",
]

# glibc <malloc.h> parameter numbers and defaults.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# mallopt takes a C int; 2 GiB - 1 is the largest trim threshold it accepts. Freed memory at the
# top of the heap is only returned once more than this is free, i.e. never within a step.
_KEEP_TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_active = False


def _libc() -> ctypes.CDLL | None:
    """The running glibc, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (glibc only).

    Returns whether the setting is in effect. Idempotent.
    """
    global _active
    with _lock:
        if _active:
            return True
        libc = _libc()
        if libc is None:
            return False
        # No mmap for big blocks (they would be unmapped on free), and no trimming of the heap.
        _active = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
        )
        return _active


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS now (`malloc_trim(0)`); False where unsupported."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)  # its result only says whether any page happened to be free
    return True


def restore_default_allocator() -> bool:
    """Put glibc's mmap/trim thresholds back to their defaults and release the cached memory.

    Returns whether anything was restored (False if `reuse_freed_memory` was not in effect).
    """
    global _active
    with _lock:
        libc = _libc()
        if not _active or libc is None:
            return False
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
        _active = False
        return True


def is_reusing_freed_memory() -> bool:
    """Whether `reuse_freed_memory` is currently in effect in this process."""
    return _active


@contextlib.contextmanager
def reusing_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Keep freed memory for reuse inside the block (when `enabled`); restore the defaults after.

    Yields whether the setting is in effect. A block nested inside another leaves it to the outer
    one to restore.
    """
    already = is_reusing_freed_memory()
    active = reuse_freed_memory() if enabled else already
    try:
        yield active
    finally:
        if enabled and not already:
            restore_default_allocator()
