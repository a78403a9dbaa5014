"""The hang watchdog: a thread per rank that notices a phase of training (an optimizer step, a
checkpoint save, a validation) running past its limit, writes what every rank was doing, and ends
the process so that the job can restart from the last commit.

Nothing in the step talks to it beyond two attribute writes per phase (`Watchdog.phase`) and one
Python call around each collective (`CollectiveLog`): no extra collective, no device read. When a
phase outlives its limit, the watchdog of that rank

1. writes `<run_dir>/hang/rank<r>.json` (host, pid, phase, step, seconds in the phase, the last
   collective this rank entered: name, group ranks, bytes, sequence number, whether it is still
   inside it and for how long) and `rank<r>.stacks.txt` (the Python stack of every thread, the
   main thread first);
2. waits up to `PEER_WAIT_S` for the other ranks' files (they time out at about the same moment:
   a rank stuck outside a collective and the ranks waiting for it in one are all in the same step),
   so that a launcher that kills the survivors when one rank exits does not cut their reports;
3. under SLURM asks for a requeue (`scontrol requeue`: the job restarts with `--resume auto`
   from the last committed checkpoint), and exits with status EXIT_HUNG.

`tools/hang_report.py` reads the files and says in a few lines which rank is stuck where and which
collective the others wait in. A Python thread needs the interpreter lock: a rank stuck in C code
that holds it (rare; collectives and sleeps release it) is reported by its peers only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
EXIT_HUNG = 5
PEER_WAIT_S = 30.0
HANG_DIR = "hang"

# the collectives of torch.distributed that block (or launch) a group-wide operation
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "scatter", "send", "recv", "monitored_barrier")


class CollectiveLog:
    """The last collective this rank entered, and the seconds spent inside collectives (a rank's
    host time outside them is its own work: the straggler measure)."""

    def __init__(self) -> None:
        self.seq = 0
        self.name: str | None = None
        self.group = None
        self.nbytes = 0
        self.entered = 0.0
        self.inside = False
        self.seconds_inside = 0.0

    def describe(self) -> dict:
        if self.name is None:
            return {"name": None, "seq": 0}
        try:
            ranks = dist.get_process_group_ranks(self.group) if self.group is not None \
                else list(range(dist.get_world_size()))
        except (RuntimeError, ValueError):
            ranks = None
        return {"name": self.name, "seq": self.seq, "group_ranks": ranks, "bytes": self.nbytes, "inside": self.inside,
                "seconds_inside": round(time.time() - self.entered, 3) if self.inside else None}


RECORD = CollectiveLog()


def _nbytes(args, kwargs) -> int:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return sum(t.numel() * t.element_size() for t in a)
    return 0


def _group(args, kwargs):
    g = kwargs.get("group")
    if g is not None:
        return g
    for a in args:
        if isinstance(a, dist.ProcessGroup):
            return a
    return None


def _recorded(name: str, fn):
    @functools.wraps(fn)
    def collective(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced by dynamo: the plain collective, which it knows
            return fn(*args, **kwargs)
        rec = RECORD
        rec.seq += 1
        rec.name, rec.group, rec.nbytes = name, _group(args, kwargs), _nbytes(args, kwargs)
        rec.entered, rec.inside = time.time(), True
        try:
            return fn(*args, **kwargs)
        finally:
            rec.inside = False
            rec.seconds_inside += time.time() - rec.entered

    collective.__flamingo_recorded__ = True
    return collective


def install_collective_log() -> CollectiveLog:
    """Record every torch.distributed collective this process calls (idempotent). Call it before
    DeepSpeed initialises: its communication backend keeps references to some functions."""
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "__flamingo_recorded__", False):
            setattr(dist, name, _recorded(name, fn))
    return RECORD


def _stacks() -> str:
    """Every thread's Python stack, the main thread first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    frames = sorted(sys._current_frames().items(), key=lambda kv: kv[0] != main)
    out = []
    for ident, frame in frames:
        out.append(f"Thread {names.get(ident, ident)}{' (main)' if ident == main else ''}, most recent call last:")
        out.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
        out.append("")
    return "\n".join(out)


def _main_frames(limit: int = 6) -> list[str]:
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return []
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_stack(frame)[-limit:]][::-1]


class Watchdog:
    """`phase(name, step, limit_s)` at each boundary of the training loop (limit 0: unwatched);
    `start()` runs the thread. `on_hang` (tests) replaces the exit."""

    def __init__(self, run_dir: str, rank: int, world_size: int, poll_s: float = 1.0) -> None:
        self.dir = os.path.join(run_dir, HANG_DIR)
        self.rank, self.world_size, self.poll_s = rank, world_size, poll_s
        self.name, self.step, self.limit, self.since = "start", 0, 0.0, time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def phase(self, name: str, step: int, limit_s: float) -> None:
        self.name, self.step, self.limit, self.since = name, step, limit_s, time.time()

    def start(self) -> "Watchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            limit, since = self.limit, self.since
            if limit > 0 and time.time() - since > limit:
                self.fire()
                return

    def report(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(), "pid": os.getpid(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "phase": self.name, "step": self.step,
                "seconds_in_phase": round(time.time() - self.since, 3), "limit_s": self.limit,
                "collective": RECORD.describe(), "collectives_entered": RECORD.seq, "main_stack": _main_frames()}

    def fire(self) -> None:
        """Write this rank's report and stacks, wait for the peers', requeue under SLURM, exit."""
        os.makedirs(self.dir, exist_ok=True)
        report = self.report()
        with open(os.path.join(self.dir, f"rank{self.rank}.stacks.txt"), "w") as f:
            f.write(_stacks())
        tmp = os.path.join(self.dir, f"rank{self.rank}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, f"rank{self.rank}.json"))
        print(f"error: rank {self.rank}: {report['phase']} of step {report['step']} has run "
              f"{report['seconds_in_phase']:.0f}s, over its limit of {self.limit:g}s: a hang. Wrote "
              f"{self.dir}/rank{self.rank}.json; after the others' reports: python tools/hang_report.py "
              f"{os.path.dirname(self.dir)}", file=sys.stderr, flush=True)
        deadline = time.time() + PEER_WAIT_S
        while time.time() < deadline and not all(
                os.path.exists(os.path.join(self.dir, f"rank{r}.json")) for r in range(self.world_size)):
            time.sleep(0.2)
        job = os.environ.get("SLURM_JOB_ID")
        if job and self.rank == min(self._reported_ranks() or [self.rank]):
            try:  # the job restarts with --resume auto from the last committed checkpoint
                subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60, check=True)
                print(f"rank {self.rank}: requeued SLURM job {job} after the hang", file=sys.stderr, flush=True)
            except (OSError, subprocess.SubprocessError) as e:
                print(f"rank {self.rank}: could not requeue SLURM job {job} ({e})", file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)

    def _reported_ranks(self) -> list[int]:
        try:
            return sorted(int(n[4:-5]) for n in os.listdir(self.dir) if n.startswith("rank") and n.endswith(".json"))
        except OSError:
            return []
