"""``precision="auto"``: train in bf16 only where it is faster for this model on this machine.

bf16 autocast is not faster everywhere: on CPUs with AMX a bf16 matrix product runs several times faster than fp32,
without AMX (avx512_bf16 alone, or avx2) the autocast casts can cost more than they save, and small models gain
little even with AMX. So the choice is measured: one training micro-batch's forward and backward, timed in fp32 and
under bf16 autocast (after a warm-up each, best of ``repeats``), bf16 kept only when it is at least ``margin``
faster. On an x86 CPU with no bf16 hardware (``vlkit.cpuinfo.bf16_emulated``: AVX2 at most) nothing is measured:
it trains in fp32, as every measurement there chose, and a bf16 pass there can take 13x fp32's. The measurement
leaves no trace: the random state is restored and the gradients cleared, so a run with "auto" follows the trajectory
of a run given the resolved precision. Results are cached per machine, torch version, model and micro-batch shape
in ``$VLKIT_CACHE`` (default ``~/.cache/vlkit``) ``/precision.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.cpuinfo import BF16_FLAGS, bf16_emulated, cpuinfo_text
from vlkit.files import write_json

__all__ = ["cache_path", "measure_precision"]

Precision = str  # "fp32" | "bf16"


def cache_path() -> Path:
    return Path(os.environ.get("VLKIT_CACHE", Path.home() / ".cache" / "vlkit")) / "precision.json"


def _describe_cpu(cpuinfo: str, fallback: str) -> str:
    """The model name and the flags that matter, from the text of /proc/cpuinfo (its first processor's entry): in the
    cache key, as a home directory shared between machines of one model name but other ``BF16_FLAGS`` would otherwise
    reuse the other one's answer."""
    name, flags = fallback, set()
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isa = "+".join(flag for flag in BF16_FLAGS if flag in flags) or "-"
    return f"{name}|{isa}"


def _machine() -> str:
    cpu = _describe_cpu(cpuinfo_text(), platform.processor() or platform.machine())
    return f"{cpu}|{torch.get_num_threads()} threads"


# Part of the cache key: raise it when a change to vlkit's own paths can change which precision is the faster, so
# that cached answers measured on the old code are measured again (2: bf16 attention's backward in fp32 on AMX CPUs,
# which took the demo's SigLIP step from slower in bf16 than in fp32 to 1.6x faster).
_REVISION = 2


def _key(device: torch.device, model: nn.Module, batch: dict[str, Any]) -> str:
    shapes = {key: list(value.shape) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    config = getattr(model, "config", None)
    described = json.dumps([config.to_dict() if hasattr(config, "to_dict") else repr(type(model)), shapes],
                           sort_keys=True, default=str)  # fmt: skip
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _machine()
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    return f"{device.type}|{device_name}|torch {torch.__version__}|r{_REVISION}|{digest}"


def measure_precision(
    model: nn.Module,
    step: Callable[[nn.Module, dict[str, Any]], Any],
    batch: dict[str, Any],
    device: torch.device,
    repeats: int = 2,
    margin: float = 1.1,
) -> tuple[Precision, dict[str, float]]:
    """The faster precision for ``step(model, batch)``'s forward + backward on ``device``, and the seconds measured
    (empty when nothing was measured: the answer came from the cache, or the device has no bf16 hardware)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", {}
    if device.type == "cpu" and bf16_emulated():
        return "fp32", {}
    path, key = cache_path(), _key(device, model, batch)
    cached = _read(path)
    if key in cached:
        return cached[key]["precision"], {}
    seconds = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for precision in ("fp32", "bf16"):
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = step(model, batch).loss
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
            seconds[precision] = min(times[1:])
    choice = "bf16" if seconds["fp32"] >= margin * seconds["bf16"] else "fp32"
    cached[key] = {"precision": choice, **{f"{name}_s": value for name, value in seconds.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cached)
    except OSError:
        pass  # a read-only home: measure again next time
    return choice, seconds


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
