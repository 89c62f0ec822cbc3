"""Run a function on W CPU ranks of a gloo process group and collect what each rank returns.

    results = run_on_ranks(check, world_size=2, args=(seed,))   # [check(0, 2, seed), check(1, 2, seed)]

``fn(rank, world_size, *args)`` must be a module-level function (it is pickled into freshly spawned processes) and
return something picklable (tensors are fine). Each rank runs with one intra-op thread, in its own process, joined
by a FileStore rendezvous in a temporary directory (no ports to collide). An exception on any rank is re-raised in
the caller with that rank's traceback; a rank that hangs (a mismatched collective) fails the call after ``timeout``.
"""

from __future__ import annotations

import multiprocessing
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


def _worker(
    fn: Callable[..., Any], rank: int, world_size: int, store_path: str, result_path: str, args: tuple, timeout: float
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            outcome: tuple[str, Any] = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # the parent re-raises it with the rank's traceback
        outcome = ("error", traceback.format_exc())
    with open(result_path, "wb") as file:
        pickle.dump(outcome, file)


def run_on_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 120.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each on its own gloo rank."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as directory:
        store = str(Path(directory) / "store")
        results = [str(Path(directory) / f"rank{rank}.pkl") for rank in range(world_size)]
        processes = [
            context.Process(target=_worker, args=(fn, rank, world_size, store, results[rank], args, timeout))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in hung:
            processes[rank].kill()
            processes[rank].join()
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout} s")
        outputs = []
        for rank, path in enumerate(results):
            if not Path(path).exists():
                raise RuntimeError(f"rank {rank} exited with code {processes[rank].exitcode} and no result")
            with open(path, "rb") as file:
                status, value = pickle.load(file)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            outputs.append(value)
        return outputs
