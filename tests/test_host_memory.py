"""``vlkit.train.host_memory``: after ``keep_freed_memory()`` a freed buffer's pages are reused, not faulted in again
(the trainer's use of it: ``tests/test_trainer.py``)."""

import json
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh process: page faults per 64 MB block malloc'ed, written and freed, with glibc's defaults, then after
# keep_freed_memory(). Plain malloc, so that the freed block fits the next request exactly (PyTorch's 64-byte aligned
# requests need a little more, and where the heap's layout leaves a hole too small for them it grows instead, for a
# few blocks: README, "Freed host memory stays in the process").
_PROBE = """
import ctypes, json, resource
from vlkit.train.host_memory import keep_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 64 << 20

def faults_per_block():
    def use():
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
    use()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        use()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

default = faults_per_block()
applied = keep_freed_memory()
print(json.dumps({"default": default, "applied": applied, "again": keep_freed_memory(), "kept": faults_per_block()}))
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no MALLOC_* variables from the caller
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] and result["again"]
    # 64 MB is 16 384 pages of 4 KiB (32 of 2 MiB where the kernel backs every mapping with huge pages): glibc's
    # defaults map the block afresh and fault in every page each time; kept, the freed block's pages are reused.
    assert result["kept"] < 100
    assert result["default"] > 10 * (result["kept"] + 1)
