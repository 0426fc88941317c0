"""Keep freed tensor memory in the process heap (glibc only), for torch on CPU.

glibc's defaults hand large freed blocks back to the kernel (munmap, heap trimming), and the
next step faults the same pages back in: a training step of a small convolutional net took
~158,000 minor page faults with the defaults and 2,500-7,400 with these settings on this project's
hosts (tests/test_heap.py measures it), and half the CPU went to the kernel. The settings are
those of the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ environment
variables, applied in-process through mallopt(3) by the trainer and by every Embedder (build,
query, serve, the UI). The price: a process keeps the heap of its largest step (freed blocks
are reused, not returned to the system): after the test's steps, 534 MB resident against 317.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20,   # blocks up to 32 MiB come from the heap
            M_TRIM_THRESHOLD: 4 << 30,    # never give the heap's top back below 4 GiB free
            M_TOP_PAD: 256 << 20}         # grow the heap 256 MiB at a time
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process. False where there is no glibc (macOS, musl): harmless,
    only slower."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _applied = all(libc.mallopt(k, v) == 1 for k, v in SETTINGS.items())
            except (OSError, AttributeError) as e:
                log.debug("mallopt unavailable: %s", e)
    return _applied
