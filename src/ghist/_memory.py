"""Giving freed heap memory back to the operating system during long loops over a slide."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


def release_freed_memory() -> None:
    """Ask glibc to return freed heap pages (``malloc_trim(0)``); a no-op elsewhere.

    Segmenting or predicting a slide allocates and frees many block-sized arrays. glibc keeps such freed memory in
    its heap (its threshold for giving memory straight back rises after each large free), so without this the
    resident size of a whole-slide run grows with the number of blocks rather than staying at a block's worth
    (``docs/benchmarks.md``).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
