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
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # whichever the launcher asked SLURM to send
EXIT_REQUEUED = 3  # a task's exit status after a stop that requeued the job (the job restarts anyway)


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
    """Records that a stop signal arrived; nothing else happens in the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None


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
        return 0
    box: list = [0]
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
