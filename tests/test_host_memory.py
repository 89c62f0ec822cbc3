"""``vlkit.train.host_memory``: after ``keep_freed_memory()`` a freed buffer's pages are reused, not faulted in again
(the trainer's use of it: ``tests/test_trainer.py``)."""

import json
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh process: faults per 64 MB allocate-and-free (a training step's activation buffers), with glibc's defaults,
# then after keep_freed_memory().
_PROBE = """
import json, resource, torch
from vlkit.train.host_memory import keep_freed_memory

def faults_per_buffer():
    for _ in range(2):
        buffer = torch.ones(16 << 20); del buffer  # 64 MB of fp32, written
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        buffer = torch.ones(16 << 20); del buffer
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

default = faults_per_buffer()
applied = keep_freed_memory()
print(json.dumps({"default": default, "applied": applied, "again": keep_freed_memory(), "kept": faults_per_buffer()}))
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no MALLOC_* variables from the caller
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] and result["again"]
    # 64 MB is 16 384 pages of 4 KiB (32 of 2 MiB where the kernel backs every mapping with huge pages): glibc's
    # defaults map and fault in every one of them each time; kept, the buffer's pages are reused.
    assert result["kept"] < 100
    assert result["default"] > 10 * (result["kept"] + 1)
