"""Run a function on N gloo ranks (torch.multiprocessing spawn), for multi-process unit tests."""

from __future__ import annotations

import gc
import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tp: int, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed

    try:
        layout = init_distributed(tp)
        result = fn(layout, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        raise
    finally:
        destroy_distributed()
        # this process ends now (results written): spare the interpreter's shutdown collections
        # over the ~670k objects torch, DeepSpeed and transformers leave, about 2 s per process
        gc.freeze()


def run_distributed(fn, world: int, tp: int, tmp_path, *args) -> list:
    """fn(layout, *args) on each rank; returns the per-rank results (fn must be importable)."""
    out_dir = str(tmp_path)
    os.makedirs(out_dir, exist_ok=True)
    for attempt in range(3):
        try:
            mp.start_processes(_worker, args=(world, _free_port(), tp, fn, args, out_dir), nprocs=world,
                               join=True, start_method="spawn")
            break
        except mp.ProcessRaisedException as e:
            # the free port we picked was taken before rank 0 bound it: pick another
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
            status, value = pickle.load(f)
        if status != "ok":
            raise AssertionError(f"rank {r} failed:\n{value}")
        results.append(value)
    return results


def capture_logs(logger: str, out: list) -> None:
    """Append every message of a flamingo_dist module logger (INFO and up) to `out`."""
    import logging

    class _ToList(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(record.getMessage())

    log = logging.getLogger(logger)
    log.setLevel(logging.INFO)
    log.addHandler(_ToList())
