"""Keeping a whole-slide run's resident memory at a block's worth: glibc heap settings and trimming."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations from this size up get their own pages, given back to the OS when freed.
MMAP_THRESHOLD = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        # both exist only in glibc: macOS, musl and Windows have neither (and need neither)
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Ask glibc to return freed heap pages (``malloc_trim(0)``); a no-op elsewhere.

    Segmenting or predicting a slide allocates and frees many block-sized arrays. glibc keeps such freed memory in
    its heap (its threshold for giving memory straight back rises after each large free), so without this the
    resident size of a whole-slide run grows with the number of blocks rather than staying at a block's worth: on an
    8k x 8k slide, segmentation left 310 MB resident that `malloc_trim` returned.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def limit_heap_retention() -> bool:
    """Fix glibc's mmap threshold at 1 MB for this process (once), so freed large buffers go back to the OS at once.

    glibc serves allocations above its mmap threshold with their own pages and returns them when freed, but it raises
    that threshold (up to 32 MB) each time such a block is freed, after which buffers of that size come from the heap
    and stay resident after use. A prediction loop frees per-batch tensors of a few MB to tens of MB thousands of
    times, so without a fixed threshold its resident size grew with the number of batches (at 16k x 16k px: 2.8 GB
    peak against 1.6 GB at 8k x 8k). Fixing the threshold (which also turns off glibc's adjustment of it, for the rest
    of the process) keeps those buffers mmapped; measured on a 4k x 4k slide it lowered predict's retained memory from
    321 MB to 72 MB at no cost in speed. Returns whether the setting was applied (False where malloc is not glibc's).
    """
    libc = _libc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    # the heap top is given back above 1 MB free too (glibc's default is 128 kB but rises with the mmap threshold)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD)) and applied
