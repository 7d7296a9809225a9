"""The C allocator of a process that trains: freed memory stays in it for the next step.

The engine allocates every step's activations and gradients afresh. By default glibc hands
a freed block of more than about 128 KiB back to the kernel (munmap, or a trim of the
heap's top once more than a few MiB there are free), so the next step takes the same
pages back one page fault at a time, each zeroed by the kernel. On the transformer of
benchmarks/sync_step.py that is 11,800 page faults in a 16-row gradient sum and 10-17% of
its time; with two workers busy on two cores, more (docs/performance.md).

`reuse_freed_memory` makes glibc keep freed memory for reuse: blocks under 32 MiB (its
most) come from the heap, and the heap's top is returned to the kernel only past 1 GiB
free. A process then holds on to its own peak: what a step freed is what the next step
takes. It applies to the processes that compute a job: its Ray workers, and the process
that runs its Trainer (in-process steps, a head start's, evaluations).
`SHARDGRAD_REUSE_FREED_MEMORY=0` leaves the allocator as it is. Other C libraries than
glibc are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit systems
TRIM_THRESHOLD = 2**30

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # else: left alone
_lock = threading.Lock()
_applied: bool | None = None  # None: not tried in this process


def reuse_freed_memory() -> bool:
    """Set this process's allocator to keep freed memory (see the module's docstring).
    Once per process; True if it is set (now or before), False where it cannot be."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _mallopt()
        return _applied


def _mallopt() -> bool:
    if not GLIBC:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    # mallopt returns 1 on success. Either call also turns off glibc's own adjustment of
    # the thresholds, which is why both are set.
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
