"""SLURM: the distributed environment from the allocation, the stop signal, and requeue.

One task per GPU (srun or submitit) runs the same trainer as `deepspeed`/`torchrun`:
`export_torch_env()` turns SLURM's variables into torch's (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR = the first node of the allocation, MASTER_PORT derived from the job
id so every task agrees without talking).

Preemption and time limits. SLURM sends a signal some time before it kills the job (submitit's
`--signal=USR2@lead`, or `--signal=USR1@lead` in launchers/train.sbatch). `StopFlag`'s handler
only records it. After every optimizer step all ranks agree on the flag with one all-reduce; if
any rank saw it, they save one committed checkpoint together and stop. Then rank 0 decides, and
`finish_stop` does it: requeue the job (`scontrol requeue`), unless the signal came at the end of
the time limit and the run already used `slurm.max_timeout_requeues` time-out requeues (counted
in `<run_dir>/slurm_requeues.json`); preemptions requeue without limit. The requeued job resumes
with `--resume auto` into the same run directory and MLflow run. A task that fails for a real
error just exits non-zero: the job fails and is never requeued by us. DataLoader workers ignore
the signal (`ignore_stop_signals`).

The same stop-and-save answers every stop signal (SIGUSR1/2, SIGTERM, SIGINT) under every launcher,
and a launcher that died (`watch_launcher`): see docs/operations.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)
# SLURM's advance warning (whichever the launcher asked for), the launchers' and the operator's
# terminate (deepspeed's launch and torchrun forward SIGTERM/SIGINT to the ranks; SLURM sends
# SIGTERM at the end), and Ctrl-C: each is a stop-and-save.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
EXIT_REQUEUED = 3  # a task's exit status after a stop that requeued the job (the job restarts anyway)
EXIT_STOPPED = 4  # stopped by a signal (or a dead launcher) after a committed checkpoint: resume with --resume auto


def started_by_srun() -> bool:
    """A task of a SLURM job step (srun, as submitit uses it), not a process torchrun started
    inside one: SLURM's variables then describe this rank and override stale RANK/WORLD_SIZE
    inherited from the submitting shell."""
    e = os.environ
    return all(k in e for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID")) and "TORCHELASTIC_RUN_ID" not in e


def _hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True,
                         timeout=60).stdout.split()
    if not out:
        raise RuntimeError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return out


def master_port(job_id: str) -> int:
    """A port every task of the job derives alike: 20000-39999 from the job id."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def export_torch_env() -> dict[str, str]:
    """Set torch.distributed's variables from SLURM's (a task started by srun or submitit). A
    MASTER_ADDR or MASTER_PORT already in the environment (set by the user) wins. Returns what
    was set."""
    e = os.environ
    ntasks = int(e.get("SLURM_NTASKS") or e.get("SLURM_NPROCS") or "1")
    nnodes = int(e.get("SLURM_JOB_NUM_NODES") or e.get("SLURM_NNODES") or "1")
    per_node = e.get("SLURM_NTASKS_PER_NODE", "")
    local_world = int(per_node.split("(")[0]) if per_node[:1].isdigit() else max(1, ntasks // nnodes)
    values = {"RANK": e["SLURM_PROCID"], "WORLD_SIZE": str(ntasks), "LOCAL_RANK": e.get("SLURM_LOCALID", "0"),
              "LOCAL_WORLD_SIZE": str(local_world),
              "MASTER_ADDR": e.get("MASTER_ADDR") or _hostnames(e["SLURM_JOB_NODELIST"])[0],
              "MASTER_PORT": e.get("MASTER_PORT") or str(master_port(e["SLURM_JOB_ID"]))}
    e.update(values)
    return values


class StopFlag:
    """Records that a stop signal arrived; nothing else happens in the handler once training runs
    (`arm`): the trainer's per-step read carries the flag to every rank, they save one committed
    checkpoint together and exit. A second signal changes nothing (the save in progress finishes
    and commits). Before `arm` nothing has been trained that a checkpoint would keep, and after
    `disarm` training is over: then a signal ends the process at once with one line. After the
    first stop request a timer ends the process if it is still alive `grace_s` later (peers dead,
    a collective that never returns): what was committed before stays the resume point."""

    def __init__(self, grace_s: float = 900.0) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self.armed = False
        self.trained = False  # disarmed after training
        self.grace_s = grace_s
        self._timer: threading.Timer | None = None

    def install(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        return self

    def arm(self, grace_s: float | None = None) -> None:
        """From now on a stop request is a stop-and-save (the training loop reads the flag)."""
        if grace_s is not None:
            self.grace_s = grace_s
        self.armed = True
        if self.raised:
            self._start_grace()

    def disarm(self) -> None:
        """Training is over (finished, stopped after its save, or failed): a signal now ends the
        process at once. (A launcher that kills the others when one rank fails sends SIGTERM
        to ranks that are already on their way out: they must not wait for a step boundary.)"""
        self.armed, self.trained = False, True

    def _handler(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name, signum)

    def request(self, reason: str, signum: int = signal.SIGTERM) -> None:
        """A stop: from a signal handler or from the launcher watch (any thread)."""
        if not self.armed:
            when = "after training ended" if self.trained else "before training started"
            print(f"stopped by {reason} {when}: nothing (more) to save", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if self.raised:
            return  # the first request is being served: a second one must not cut the save short
        self.signum, self.reason = signum, reason
        log.warning(f"stop requested ({reason}): saving a checkpoint at the end of this step, then exiting")
        self._start_grace()

    def _start_grace(self) -> None:
        if self._timer is None and self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self._grace_over)
            self._timer.daemon = True
            self._timer.start()

    def _grace_over(self) -> None:
        print(f"error: stop requested ({self.reason}) {self.grace_s:.0f}s ago and this rank has not finished "
              "(train.stop_grace_s): exiting; the last committed checkpoint is the resume point",
              file=sys.stderr, flush=True)
        os._exit(EXIT_STOPPED)

    @property
    def raised(self) -> bool:
        return self.signum is not None


def launcher_processes(pid: int | None = None) -> list[tuple[int, float]]:
    """The processes whose death orphans this rank, as (pid, start time) so a reused pid is not
    mistaken for them: under `deepspeed`, the rank's parent (DeepSpeed's `launch`) and its parent
    (the `deepspeed` runner, which exits on SIGTERM without waiting for its ranks); under torchrun,
    the parent (its agent). None under srun (SLURM reaps its tasks) or for a plain process."""
    import psutil

    me = psutil.Process(pid)
    parent = me.parent()
    if parent is None or started_by_srun():
        return []
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return [(parent.pid, parent.create_time())]
    try:
        cmd = " ".join(parent.cmdline())
    except psutil.Error:
        return []
    if "deepspeed.launcher.launch" not in cmd:
        return []
    out = [(parent.pid, parent.create_time())]
    runner = parent.parent()
    try:
        if runner is not None and runner.pid != 1 and "deepspeed" in " ".join(runner.cmdline()):
            out.append((runner.pid, runner.create_time()))
    except psutil.Error:
        pass
    return out


def alive(pid: int, start_time: float) -> bool:
    """Is the process `pid` that started at `start_time` still there (not a reuse of its pid)?"""
    import psutil

    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - start_time) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_launcher(flag: StopFlag, poll_s: float = 1.0) -> threading.Thread | None:
    """A daemon thread that requests a stop when a launcher process of this rank has died
    (`launcher_processes`): the ranks save and exit instead of training on as orphans."""
    watched = launcher_processes()
    if not watched:
        return None

    def watch():
        while not flag.raised:
            for pid, start in watched:
                if not alive(pid, start):
                    flag.request(f"launcher process {pid} gone")
                    return
            time.sleep(poll_s)

    t = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    t.start()
    return t


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: workers ignore the stop signal (the trainer handles it)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _time_left_s(job_id: str) -> float | None:
    """Seconds until the job's time limit (None when unlimited or unknown)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", out)
    if not m:
        return None
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def decide_requeue(run_dir: str, timeout_margin_s: float, max_timeout_requeues: int,
                   time_left_s: float | None) -> tuple[bool, str]:
    """Rank 0, after the stop checkpoint: (requeue?, why). A signal with less than
    timeout_margin_s left before the time limit is a time-out; anything else a preemption.
    Counts are kept in <run_dir>/slurm_requeues.json."""
    path = os.path.join(run_dir, "slurm_requeues.json")
    counts = {"preempted": 0, "timed_out": 0}
    if os.path.isfile(path):
        with open(path) as f:
            counts.update(json.load(f))
    timed_out = time_left_s is not None and time_left_s <= timeout_margin_s
    if timed_out and counts["timed_out"] >= max_timeout_requeues:
        return False, (f"the job reached its time limit and already used its {max_timeout_requeues} time-out "
                       "requeues (slurm.max_timeout_requeues); not requeued")
    counts["timed_out" if timed_out else "preempted"] += 1
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(counts, f)
    os.replace(path + ".tmp", path)
    kind = "time limit" if timed_out else "preemption"
    return True, f"{kind}: requeued (preemptions {counts['preempted']}, time-outs {counts['timed_out']})"


def finish_stop(run_dir: str, rank: int, signal_lead_s: float, max_timeout_requeues: int) -> int:
    """Collective, after every rank saved the stop checkpoint: rank 0 requeues the job when it
    should, and every rank learns the outcome before exiting (a task that exited first would make
    srun kill rank 0 before its requeue). Returns the exit status for this task."""
    import torch.distributed as dist

    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        log.info("stopped by signal after a committed checkpoint; resume with --resume auto")
        return EXIT_STOPPED
    box: list = [EXIT_STOPPED]
    if rank == 0:
        try:
            requeue, why = decide_requeue(run_dir, signal_lead_s + 60, max_timeout_requeues, _time_left_s(job_id))
            log.info(f"stop signal: {why}")
            if requeue:
                subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=60)
                box[0] = EXIT_REQUEUED
        except (OSError, subprocess.SubprocessError) as e:  # the checkpoint is committed; say why no requeue
            log.warning(f"stop signal: requeue failed ({e}); resubmit with --resume auto")
            box[0] = 1
    dist.broadcast_object_list(box, src=0)
    return box[0]
