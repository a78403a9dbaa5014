"""MLflow tracking on rank 0 only, and the progress display.

The run id is decided on rank 0 and broadcast, so every rank agrees on it (checkpoints and the
SLURM requeue path reuse it). By default the store is an sqlite file inside the run directory
(MLflow 3.x refuses its plain file store unless MLFLOW_ALLOW_FILE_STORE=true);
$MLFLOW_TRACKING_URI or tracking.tracking_uri override it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from importlib import metadata

import torch.distributed as dist

from flamingo_dist.config.schema import TrackingConfig, flatten, to_dict

_PACKAGES = ("torch", "deepspeed", "transformers", "megatron-core", "open_clip_torch", "webdataset",
             "mlflow", "submitit", "flamingo_dist")


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.abspath(os.path.join(cfg.run_dir, "mlflow.db"))


def provenance(layout) -> dict[str, str]:
    """Where this run came from: git commit, package versions, command line, hosts, layout.
    Collective: every rank must call it (hostnames are gathered)."""
    hosts = [None] * layout.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    out = {"git_commit": commit + ("-dirty" if dirty else ""), "command": " ".join(sys.argv),
           "python": sys.version.split()[0], "hosts": ",".join(sorted(set(hosts))),
           "world_size": str(layout.world_size), "tensor_parallel_size": str(layout.tp_size),
           "data_parallel_size": str(layout.dp_size), "device": str(layout.device.type)}
    for pkg in _PACKAGES:
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


class Tracker:
    """Logs to MLflow from rank 0; a no-op elsewhere. Collective in __init__ (run id broadcast)."""

    def __init__(self, cfg: TrackingConfig, job_cfg, layout, run_name: str, run_id: str | None = None):
        """`run_id`: continue that MLflow run (a resumed job), else start a new one."""
        self.rank = layout.rank
        self.mlflow = None
        prov = provenance(layout)
        if self.rank == 0 and cfg.mlflow:
            import mlflow

            os.makedirs(cfg.run_dir, exist_ok=True)
            mlflow.set_tracking_uri(tracking_uri(cfg))
            mlflow.set_experiment(cfg.experiment)
            if run_id is not None:
                mlflow.start_run(run_id=run_id)  # params were logged by the first attempt
                mlflow.set_tag(f"resumed.{int(time.time())}", prov["command"])
            else:
                run = mlflow.start_run(run_name=cfg.run_name or run_name)
                run_id = run.info.run_id
                params = {k: str(v) for k, v in flatten(to_dict(job_cfg)).items()}
                mlflow.log_params(params)
                mlflow.log_params({f"provenance.{k}": v for k, v in prov.items()})
            mlflow.set_tags({"git_commit": prov["git_commit"], "hosts": prov["hosts"]})
            self.mlflow = mlflow
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        self.run_id: str | None = box[0]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal, plain log lines otherwise."""

    def __init__(self, total: int, rank: int, log_every: int):
        self.rank, self.log_every, self.total = rank, log_every, total
        self.bar = None
        self.t0 = time.time()
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        short = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                 "tok/s": f"{metrics['tokens_per_s']:.0f}", "img/s": f"{metrics['images_per_s']:.1f}"}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(short)
        elif step % self.log_every == 0 or step == self.total:
            print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in short.items())
                  + f" grad_norm {metrics['grad_norm']:.3f} skipped {int(metrics['skipped_steps'])}"
                  + f" elapsed {time.time() - self.t0:.1f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
