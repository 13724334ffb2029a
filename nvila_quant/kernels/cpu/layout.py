"""The T16 weight layout of the CPU kernels and the memory it lives in.

T16 is a load-time permutation of nibble rows (N, K/2) uint8, same shape and bytes: 16 output rows interleaved per
64-wide K chunk, so one 64-byte load gives a vector of 16 rows x 4 nibble pairs that the kernels multiply against
broadcast activations (``csrc/t16.c`` documents the byte order). A slice of whole 16-row units unpacks on its own.
Packed weights live as long as the layer and stream at every call, so on Linux layers of 2 MB or more get a map of
their own advised for transparent huge pages (``NVILA_QUANT_CPU_HUGE_PAGES=0`` turns it off).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap

import torch

from nvila_quant.kernels.cpu.native import t16_convert
from nvila_quant.kernels.cpu.settings import cpu_settings

__all__ = ["HUGE_PAGE", "empty_huge_pages", "t16_pack", "t16_unpack"]

HUGE_PAGE = 2 * 1024**2  # x86-64 transparent huge page


def empty_huge_pages(nbytes: int) -> torch.Tensor:
    """Uninitialised (nbytes,) uint8 CPU tensor whose whole 2 MB spans the OS may back with transparent huge pages
    (Linux, THP "madvise" or "always"; a plain ``torch.empty`` elsewhere, below 2 MB or when turned off). A layer's
    weight stream then crosses no 4 KB page boundaries (fewer TLB misses). Anonymous memory mapped on its own,
    untouched until written, so the pages come fresh; its tail past the last whole 2 MB stays in 4 KB pages (no
    memory beyond nbytes is touched)."""
    if (not cpu_settings().huge_pages or nbytes < HUGE_PAGE
            or not (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS"))):
        return torch.empty(nbytes, dtype=torch.uint8)
    # private (a shared anonymous map is shmem, whose huge pages are off by default); page aligned, and the slack
    # makes room for a 2 MB aligned start
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE
    with contextlib.suppress(OSError):  # (a kernel built without THP refuses the advice: 4 KB pages, as torch's)
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)  # (keeps buf mapped while alive)


def t16_pack(rows: torch.Tensor) -> torch.Tensor:
    """Nibble rows (N, K/2) uint8 -> the T16 layout (same shape and bytes, 16 rows interleaved), on huge pages."""
    out = empty_huge_pages(rows.numel()).view(rows.shape)
    return t16_convert("nq_t16_pack", rows, out)


def t16_unpack(t16: torch.Tensor) -> torch.Tensor:
    """The T16 layout -> nibble rows (N, K/2) uint8. A slice of whole 16-row units unpacks on its own."""
    return t16_convert("nq_t16_unpack", t16, torch.empty(t16.shape, dtype=torch.uint8))
