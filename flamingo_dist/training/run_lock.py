"""One run per run directory.

Two runs writing one run directory replace each other's checkpoints and interleave their metrics
(issue 20: staggered, the second replaced the first's step_40..step_60 and `metrics.jsonl` held
two records for step 1). Rank 0 holds `<run_dir>/RUN.lock` for the whole run: a JSON record of
the holder (host, pid, the process's start time, SLURM job id, when it started) created with
O_EXCL, which also works on NFS (v3 and later), where flock may not. The holder refreshes the
file's modification time every HEARTBEAT_S seconds from a daemon thread.

A second run finds the lock and is refused with one line naming the holder, unless the holder is
gone:
- on this host: no process with that pid and start time;
- the same SLURM job (a requeued job's new tasks: SLURM ended the old ones before restarting it);
- on another host: no heartbeat for STALE_AFTER_S seconds (that host cannot be asked).
A lock taken over is logged as a warning naming the previous holder. The same process may take
its own lock again (several trainers one after another in one process, as tests do).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)
LOCK = "RUN.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirectoryBusy(RuntimeError):
    """Another live run holds the run directory."""


def _me() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": psutil.Process().create_time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _holder_gone(holder: dict, age_s: float, me: dict) -> str | None:
    """Why the lock's holder no longer runs, or None when it may (or does)."""
    from flamingo_dist.distributed.slurm import alive

    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return "the same SLURM job, requeued"
    if holder.get("host") == me["host"]:
        if not alive(int(holder.get("pid", -1)), float(holder.get("start_time", 0.0))):
            return "its process has ended"
        return None
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f}s"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


class RunLock:
    """`acquire()` takes the run directory or raises RunDirectoryBusy (one line); `release()`
    gives it back (only if still ours)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self.me: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        me = self.me = _me()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._read()
                if holder is None:  # written but not yet filled by its holder, or garbage: check again
                    if age < 5.0:
                        time.sleep(0.5)
                        continue
                    why = "its lock file is unreadable"
                elif holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    why = None  # our own, from an earlier trainer of this process
                else:
                    why = _holder_gone(holder, age, me)
                    if why is None:
                        raise RunDirectoryBusy(f"{self.run_dir} is in use by another run ({describe(holder)}): "
                                               "one run per directory; give this run its own tracking.run_dir, "
                                               f"or stop that run (if it is truly gone, delete {self.path})") from None
                    log.warning(f"{self.path}: taking over the lock of {describe(holder)} ({why})")
                self._write(me)
                break
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                break
        else:
            raise RunDirectoryBusy(f"{self.path}: could not take the run directory's lock (it keeps changing)")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - os.path.getmtime(self.path)
            with open(self.path) as f:
                return json.load(f), age
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            return None, age

    def _write(self, me: dict) -> None:
        tmp = f"{self.path}.{me['host']}-{me['pid']}"
        with open(tmp, "w") as f:
            json.dump(me, f)
        os.replace(tmp, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as e:  # the directory went away or is read-only: say so, keep training
                log.warning(f"{self.path}: heartbeat failed ({e})")

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._read()
        if holder is not None and self.me is not None and holder.get("pid") == self.me["pid"] \
                and holder.get("host") == self.me["host"]:
            os.remove(self.path)
