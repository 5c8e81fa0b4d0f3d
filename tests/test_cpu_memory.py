"""cpu_memory: glibc keeps freed blocks for reuse while training, and gets its defaults back after.

Measured by what the setting is for, in a fresh interpreter: minor page faults. A 64 MiB tensor
allocated and freed in a loop faults all of its 16,384 pages back in each time under glibc's
defaults, and none once freed memory is kept; restoring the defaults returns the kept memory.
(Which training runs keep freed memory is the trainer's allocator policy: tests/training/test_trainer.py.)
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from sae_lens import cpu_memory

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt tuning exists only with glibc; elsewhere the functions return False (tested below)",
)

PAGES = 64 * 1024 * 1024 // 4096


@pytest.fixture(autouse=True)
def glibc_defaults() -> Iterator[None]:
    """Start and end with glibc's defaults, whatever an earlier test left."""
    cpu_memory.restore_default_allocator()
    yield
    cpu_memory.restore_default_allocator()


PROBE = """
import json, resource, torch
from sae_lens import cpu_memory

PAGES = 64 * 1024 * 1024 // 4096

def faults_per_allocation(n=5):
    for _ in range(3):  # the first allocations may grow the heap; not counted
        torch.ones(PAGES * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(PAGES * 1024)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

out = {"default_faults": faults_per_allocation(), "was_on": cpu_memory.is_reusing_freed_memory()}
out["turned_on"] = cpu_memory.reuse_freed_memory() and cpu_memory.reuse_freed_memory()
out["reuse_faults"] = faults_per_allocation()
held = [torch.ones(PAGES * 1024) for _ in range(4)]  # 256 MiB, then freed into the heap
del held
out["rss_kept"] = rss_mb()
out["restored"] = cpu_memory.restore_default_allocator()
out["restored_twice"] = cpu_memory.restore_default_allocator()
out["rss_released"] = rss_mb()
out["still_on"] = cpu_memory.is_reusing_freed_memory()
print(json.dumps(out))
"""


def run_probe() -> dict[str, Any]:
    """Run PROBE in a fresh interpreter: page faults depend on the heap's history, which a test
    process full of earlier tests would make unpredictable."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_defaults_fault_every_page_back_in_and_reuse_faults_none() -> None:
    probe = run_probe()
    assert not probe["was_on"]
    assert probe["default_faults"] >= PAGES * 0.9
    assert probe["turned_on"]
    assert probe["reuse_faults"] < PAGES * 0.05
    # Restoring hands the kept memory back to the OS.
    assert probe["restored"] and not probe["restored_twice"] and not probe["still_on"]
    assert probe["rss_kept"] - probe["rss_released"] > 200
    assert cpu_memory.release_freed_memory()


def test_without_glibc_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert not cpu_memory.reuse_freed_memory()
    assert not cpu_memory.is_reusing_freed_memory()
    assert not cpu_memory.release_freed_memory()
    assert not cpu_memory.restore_default_allocator()


@glibc_only
def test_reusing_freed_memory_context_restores_only_what_it_turned_on() -> None:
    with cpu_memory.reusing_freed_memory() as active:
        assert active and cpu_memory.is_reusing_freed_memory()
        with cpu_memory.reusing_freed_memory() as inner:  # nested: the outer block restores
            assert inner
        assert cpu_memory.is_reusing_freed_memory()
        with cpu_memory.reusing_freed_memory(enabled=False) as off:
            assert off  # already on: a disabled block reports the setting in effect, changes nothing
        assert cpu_memory.is_reusing_freed_memory()
    assert not cpu_memory.is_reusing_freed_memory()
    with cpu_memory.reusing_freed_memory(enabled=False) as off:
        assert not off and not cpu_memory.is_reusing_freed_memory()
