"""The text of ``/proc/cpuinfo``, read once per process ("" where there is none): what the CPU kernel choices
(``layers/linear.py``) and the precision cache key (``train/precision.py``) look at."""

from __future__ import annotations

import functools
from pathlib import Path


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
