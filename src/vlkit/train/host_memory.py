"""Keep the host memory a training step frees for the next step, instead of handing it back to the kernel.

A CPU training step allocates and frees the same activation and gradient buffers every step. glibc's ``malloc``
serves a request above its mmap threshold (128 KiB at start, raised automatically up to 32 MiB) with a fresh
``mmap``, and gives the free memory at the top of its heap back to the kernel once more than the trim threshold
(twice the mmap threshold) is free; either way the next step writes to pages the kernel must fault in and zero
again. Measured on a 2-core AMX Xeon (``python bench/host_memory.py``): ~31 000 page faults per step (120 MB) in
``honeybee_c_shapes``' instruct step and ~24 000 in ``shapes_siglip``'s. Raising both thresholds once per process
(``mallopt``) keeps the freed memory in the process for reuse: no faults, and those steps 1.13x and 1.07x faster
(CLIP ViT-B/16 1.14x). Whole runs gain less: ``siglip_patch_shapes`` 1.06-1.16x, the VLM's long instruct stage
nothing (glibc's own adaptation already spares it most faults there). README, "Speed".

``keep_freed_memory()`` does that on glibc (Linux) and nothing elsewhere (other C libraries, macOS, Windows); the
trainer calls it when a run starts unless ``TrainConfig.keep_freed_memory`` is off. It is a process-wide setting, as
preloading jemalloc or tcmalloc would be, and stays for the process's life: memory freed after a peak stays with the
process (up to ``THRESHOLD`` at the top of the heap) rather than going back to the system. The heap can also hold
more than the peak: PyTorch asks for 64-byte aligned blocks, a little more than a freed block of the same size
offers, so a loop that allocates and frees one large tensor grows the heap by a few blocks before it settles (64 MB
tensors: 778 against 330 MB resident after 8 allocations, then flat; 16-24 MB: +50-60 MB). Training steps, which
free whole steps' worth of blocks together, peaked within 2 % of their default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

__all__ = ["THRESHOLD", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Requests up to this size come from the heap, and up to this much free memory stays at its top. Setting either
# parameter turns glibc's automatic adjustment of both off, so both are set. glibc's manual gives 32 MiB as the mmap
# threshold's maximum on 64-bit systems; glibc 2.36 accepts 1 GiB (a CLIP ViT-B/16 step frees 100 MB buffers), and
# where it does not, 32 MiB is the fallback.
THRESHOLD = 1 << 30
_DOCUMENTED_MAX = 32 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to ``THRESHOLD`` (once per process); whether they are set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: a trim threshold set alone would stop the mmap threshold's automatic rise and leave
    # every request above 128 KiB to mmap (measured: 3x the faults).
    if not (mallopt(_M_MMAP_THRESHOLD, THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, _DOCUMENTED_MAX)):
        logger.info("glibc refused the mmap threshold; freed host memory goes back to the kernel as before")
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
