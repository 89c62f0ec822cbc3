"""The text of ``/proc/cpuinfo``, read once per process ("" where there is none): what the CPU kernel choices
(``layers/linear.py``) and the precision cache key (``train/precision.py``) look at; and whether PyTorch sees AMX
tiles (``layers/attention.py``, the demo's VLM budget) and bf16 dot-product instructions (``layers/attention.py``),
or no bf16 hardware at all (``train/precision.py``); and the machine a run trained on (``describe_machine``: every
run's metrics, the benches' tables)."""

from __future__ import annotations

import functools
import platform
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


# The instruction sets that decide bf16's speed. A virtual machine's model name need not tell them apart: two
# development machines both read "AMD EPYC", one with avx512_bf16 (the demo's tower 1.6x faster in bf16), one with
# avx2 alone (one of the demo's steps 13x slower in bf16).
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def describe_machine(device: torch.device | str = "cpu") -> str:
    """What a run trains on, in words: a GPU's name, or the CPU's model name with those of ``BF16_FLAGS`` it has and
    PyTorch's thread count; and PyTorch's version. Times and the precision ``auto`` picks depend on all of it."""
    device = torch.device(device)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        flags = set(cpuinfo_field("flags").split())
        isa = ", ".join(flag for flag in BF16_FLAGS if flag in flags) or "no " + " / ".join(BF16_FLAGS)
        name = cpuinfo_field("model name") or platform.processor() or platform.machine()
        where = f"{name} ({isa}), {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


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


def bf16_emulated() -> bool:
    """Whether this is an x86 CPU with no bf16 hardware at all (neither AVX-512 nor AMX; AVX2 at most), where oneDNN
    computes a bf16 product by converting it to fp32: every bf16 training step measured on such a CPU was slower than
    fp32's, 1.6-9.9x over the test suite's 58 models and 2.6-13x over the demo's stages (docs/experiments.md, the
    fifty-sixth session). False off x86 (ARM CPUs list "Features", not "flags"), where bf16 may have hardware."""
    flags = set(cpuinfo_field("flags").split())
    return bool(flags) and not flags & {"avx512f", "amx_bf16"}
