"""Submit a training job to SLURM through submitit: one task per GPU, every task runs the same
trainer as `deepspeed flamingo_dist/train.py`.

    python launchers/submitit_launch.py --deepspeed ds_configs/zero2.json --config my.yaml \\
        --nodes 4 --gpus-per-node 8 --cpus-per-task 12 --mem 0 --partition gpu --time 4320 \\
        --account proj --qos high --exclusive --log-folder runs/my-run/slurm

It prints the job id and where the logs are; `--wait` streams rank 0's log until the job ends,
`--dry-run` prints the sbatch script instead of submitting. The job always starts with
`--resume auto`, so after a preemption or time-out requeue it continues from the newest committed
checkpoint of the same run directory and MLflow run (see flamingo_dist/distributed/slurm.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("training (as for flamingo_dist/train.py)")
    g.add_argument("--deepspeed", required=True, metavar="PATH")
    g.add_argument("--config", metavar="YAML")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; one task per GPU (0: CPU tasks)")
    c.add_argument("--tasks-per-node", type=int, help="tasks per node when not one per GPU (CPU runs)")
    c.add_argument("--cpus-per-task", type=int, default=8)
    c.add_argument("--mem", help="memory per node, e.g. 0 (all), 480G")
    c.add_argument("--partition")
    c.add_argument("--account")
    c.add_argument("--qos")
    c.add_argument("--constraint")
    c.add_argument("--time", type=int, default=60 * 24, help="time limit in minutes")
    c.add_argument("--exclusive", action="store_true")
    c.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch reservation=r1 (repeatable)")
    c.add_argument("--job-name", default="flamingo")
    c.add_argument("--log-folder", help="submitit folder for logs and job files; default <run_dir>/slurm")
    c.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit SLURM sends the stop signal (time to save)")
    c.add_argument("--python", default=sys.executable, help="interpreter the tasks run")
    a = p.add_argument_group("actions")
    a.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    a.add_argument("--wait", action="store_true", help="stream rank 0's log until the job ends")
    return p.parse_args(argv)


def _sbatch_extra(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise SystemExit(f"error: --sbatch {item!r}: expected KEY=VALUE or KEY")
        out[key.lstrip("-").replace("-", "_")] = value if sep else True
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from flamingo_dist.config.schema import ConfigError
    from flamingo_dist.train import checked_inputs, print_error

    tasks_per_node = args.tasks_per_node or args.gpus_per_node
    if args.nodes < 1:
        print(f"error: --nodes must be >= 1, got {args.nodes}", file=sys.stderr)
        return 2
    if tasks_per_node < 1:
        print("error: --gpus-per-node 0 needs --tasks-per-node", file=sys.stderr)
        return 2
    train_argv = ["--deepspeed", os.path.abspath(args.deepspeed), *sum((["--set", s] for s in args.set), [])]
    if args.config:
        train_argv += ["--config", os.path.abspath(args.config)]
    overrides = list(args.set) + [f"slurm.signal_lead_s={args.signal_lead}"]
    try:  # fail here, not in the queue
        cfg = checked_inputs(args.config, overrides, args.deepspeed, args.nodes * tasks_per_node)
    except ConfigError as e:
        print_error(e)
        return 2
    train_argv += ["--set", f"slurm.signal_lead_s={args.signal_lead}", "--resume", "auto"]
    folder = os.path.abspath(args.log_folder or os.path.join(cfg.tracking.run_dir, "slurm"))

    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR2"  # read when submitit is imported
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    from flamingo_dist.train import TrainTask

    params = dict(nodes=args.nodes, ntasks_per_node=tasks_per_node, cpus_per_task=args.cpus_per_task,
                  time=args.time, job_name=args.job_name, signal_delay_s=args.signal_lead,
                  srun_args=["--kill-on-bad-exit=1"], stderr_to_stdout=True,
                  setup=["trap '' USR2  # the batch shell ignores the stop signal; the training tasks act on it"])
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    extra = {"requeue": True, **_sbatch_extra(args.sbatch)}
    if args.exclusive:
        extra["exclusive"] = True
    params["additional_parameters"] = extra
    if args.dry_run:
        command = f"{args.python} -u -m submitit.core._submit {folder}"
        print(_make_sbatch_string(command=command, folder=os.path.join(folder, "%j"), **params))
        print(f"# each task runs: flamingo_dist.train.TrainTask({train_argv})", file=sys.stderr)
        return 0
    executor = submitit.SlurmExecutor(folder=os.path.join(folder, "%j"), python=args.python,
                                      max_num_timeout=10 ** 6)  # our trainer decides requeues, not submitit
    executor.update_parameters(**params)
    job = executor.submit(TrainTask(train_argv))
    log = str(job.paths.stdout).replace("%t", "0")
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {tasks_per_node} task(s); logs {log} "
          f"(task t: {str(job.paths.stdout).replace('%t', 't')})", flush=True)
    if not args.wait:
        return 0
    return _stream(job, log)


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def _state(job) -> str:
    """The job's SLURM state from accounting (a requeued job is PENDING/RUNNING again, not done)."""
    return (job.get_info(mode="force").get("State") or "UNKNOWN").split()[0]


def _stream(job, log: str) -> int:
    """Print rank 0's log as it grows until the job ends; the job's final state decides our exit."""
    pos, state = 0, "UNKNOWN"
    while True:
        state = _state(job)
        if os.path.isfile(log):
            with open(log, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                print(chunk, end="", flush=True)
        if state in ENDED:
            break
        time.sleep(2)
    print(f"job {job.job_id} ended: {state}", flush=True)
    return 0 if state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
