"""The text of ``/proc/cpuinfo``, read once per process ("" where there is none): what the CPU kernel choices
(``layers/linear.py``) and the precision cache key (``train/precision.py``) look at; and whether PyTorch sees AMX
tiles (``layers/attention.py``, the demo's VLM budget) and bf16 dot-product instructions (``layers/attention.py``)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpuinfo_field(name: str) -> str:
    """The first processor's ``name`` field (``vendor_id``, ``model name``, ...), or "" where there is none."""
    for line in cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


@functools.cache
def amx_tiles() -> bool:
    """Whether PyTorch sees AMX tiles on this CPU (bf16 matrix units: Xeons from Sapphire Rapids on)."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return is_amx is not None and bool(is_amx())


@functools.cache
def avx512_bf16() -> bool:
    """Whether PyTorch sees AVX-512 bf16 dot products on this CPU (bf16 products in vector units, not emulated)."""
    is_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return is_bf16 is not None and bool(is_bf16())
