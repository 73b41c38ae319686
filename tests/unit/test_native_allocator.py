"""The compiled extension's allocator does not ask the kernel for transparent huge pages.

mimalloc (the extension's global allocator, native/src/lib.rs) advises its arena `MADV_HUGEPAGE` unless built
with its `no_thp` feature (native/Cargo.toml). A worker's heap grows in bursts and is purged in small pieces:
with huge pages each first touch zeroed 2 MiB and each purge split one: page faults were 11% of a first-sight
worker's main thread, 2% without (docs/benchmark.md, round 24). The kernel marks an advised
mapping with `hg` in /proc/<pid>/smaps, so a build that lost the feature fails here.
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = [
    pytest.mark.skipif(os.environ.get("NATIVE") == "0", reason="NATIVE=0: built without the compiled hot path"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and smaps are Linux's"),
]


def _hugepage_advised_mappings() -> list[str]:
    """Address ranges of this process's mappings advised MADV_HUGEPAGE (VmFlags `hg`)."""
    advised: list[str] = []
    current = ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line.startswith("VmFlags:"):
                if "hg" in line.split()[1:]:
                    advised.append(current)
            elif not line[0].isupper():  # a mapping's header: "start-end perms offset dev inode [path]"
                current = line.split()[0]
    return advised


def test_the_extension_allocates_without_asking_for_huge_pages() -> None:
    import guard_native

    before = _hugepage_advised_mappings()
    key = guard_native.SealingKey(os.urandom(32), 1)
    # Enough keys and wrappings that the allocator has reserved and committed its arena.
    wrapped, keys = key.mint_keys([b"dek/bench/%d" % n for n in range(20_000)], 1)
    assert len(wrapped) == len(keys) == 20_000
    assert _hugepage_advised_mappings() == before == []
