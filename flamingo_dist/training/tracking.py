"""MLflow tracking on rank 0 only, and the progress display.

The run id is decided on rank 0 and broadcast, so every rank agrees on it (checkpoints and the
SLURM requeue path reuse it). By default the store is an sqlite file inside the run directory
(MLflow 3.x refuses its plain file store unless MLFLOW_ALLOW_FILE_STORE=true);
$MLFLOW_TRACKING_URI or tracking.tracking_uri override it.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from typing import Any, Callable

import torch.distributed as dist

from flamingo_dist.config.schema import ConfigError, TrackingConfig, flatten, to_dict

log = logging.getLogger(__name__)
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


class TrackingUnavailable(ConfigError):
    """tracking.required and the store did not answer in time (the entry point's one `error:` line)."""


_END = object()


class _Sender(threading.Thread):
    """Rank 0: every MLflow call, in order, on this thread, so that the training thread only puts
    records in a bounded queue. A call that fails (server down, store read-only, network) is
    retried with backoff (up to 10 s apart) until it succeeds: nothing is lost while the server is away, and the
    backlog is replayed once it answers. (metrics.jsonl holds every record whatever happens here.)"""

    def __init__(self, start: Callable[[Any], str], queue_size: int):
        super().__init__(name="mlflow-sender", daemon=True)
        self.start_fn = start
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.started = threading.Event()
        self.run_id: str | None = None
        self.last_error: str | None = None
        self.dropped = 0  # records refused because the queue was full (they are in metrics.jsonl)
        self.deadline: float | None = None  # set by close(): give up retrying after it
        self.failures = 0

    def _retry(self, call, what: str):
        """`call()` until it succeeds; False when the close deadline passed first."""
        delay = 0.5
        while True:
            try:
                call()
                if self.failures:
                    log.warning(f"MLflow answers again after {self.failures} failed tries; sending what waited")
                self.failures, self.last_error = 0, None
                return True
            except Exception as e:  # noqa: BLE001 - any failure of the tracking service: retried, reported once
                self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if self.failures == 0:
                    log.warning(f"MLflow {what} failed ({self.last_error}); training goes on, retrying in the "
                                "background (every record is in metrics.jsonl)")
                self.failures += 1
            if self.deadline is not None and time.time() + delay > self.deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 10.0)

    def run(self) -> None:
        import mlflow

        def start():
            self.run_id = self.start_fn(mlflow)

        if not self._retry(start, "start"):
            return
        self.started.set()
        while True:
            item = self.queue.get()
            if item is _END:
                return
            kind, payload = item
            if kind == "metrics":
                call = functools.partial(mlflow.log_metrics, payload[0], step=payload[1])
            else:  # "end"
                call = functools.partial(mlflow.end_run, status=payload)
            if not self._retry(call, "logging" if kind == "metrics" else "end of run"):
                return

    def pending(self) -> int:
        return self.queue.qsize()


class Tracker:
    """Logs to MLflow from rank 0 (a background sender: training never waits for it); a no-op
    elsewhere. Collective in __init__ (provenance gathered, run id broadcast).

    The store not answering at start is one warning (the run id comes when it answers), or, with
    tracking.required, an error within tracking.start_timeout_s. A resumed run whose MLflow run is
    gone (store deleted or replaced) gets a new run, tagged with the old id."""

    def __init__(self, cfg: TrackingConfig, job_cfg, layout, run_name: str, run_id: str | None = None):
        """`run_id`: continue that MLflow run (a resumed job), else start a new one."""
        self.rank = layout.rank
        self.cfg = cfg
        self.sender: _Sender | None = None
        self._run_id = run_id
        prov = provenance(layout)
        error: list = [None]
        if self.rank == 0 and cfg.mlflow:
            os.makedirs(cfg.run_dir, exist_ok=True)
            # our sender retries with its own backoff: one HTTP try per call, bounded in time
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(cfg.request_timeout_s))))
            uri, params = tracking_uri(cfg), {k: str(v) for k, v in flatten(to_dict(job_cfg)).items()}

            def start(mlflow) -> str:
                mlflow.set_tracking_uri(uri)
                mlflow.set_experiment(cfg.experiment)
                tags = {"git_commit": prov["git_commit"], "hosts": prov["hosts"]}
                if run_id is not None and _run_exists(mlflow, run_id):
                    mlflow.start_run(run_id=run_id)  # params were logged by the first attempt
                    mlflow.set_tags({**tags, f"resumed.{int(time.time())}": prov["command"]})
                    return run_id
                if run_id is not None:
                    log.warning(f"MLflow run {run_id} is not in {uri} (store replaced or deleted): this resume "
                                "logs to a new run, tagged resumed_from_run_id")
                    tags["resumed_from_run_id"] = run_id
                run = mlflow.start_run(run_name=cfg.run_name or run_name)
                mlflow.log_params(params)
                mlflow.log_params({f"provenance.{k}": v for k, v in prov.items()})
                mlflow.set_tags(tags)
                return run.info.run_id

            self.sender = _Sender(start, cfg.queue_size)
            self.sender.start()
            if not self.sender.started.wait(cfg.start_timeout_s):
                why = self.sender.last_error or "no answer"
                if cfg.required:
                    error[0] = (f"tracking.required: MLflow at {uri} did not start the run within "
                                f"{cfg.start_timeout_s:g}s ({why})")
                    self.sender.deadline = time.time()
                    self.sender = None
                else:
                    log.warning(f"MLflow at {uri} did not start the run within {cfg.start_timeout_s:g}s ({why}): "
                                "training goes on; metrics are in metrics.jsonl and go to MLflow when it answers "
                                "(tracking.required: true to stop instead)")
            elif self.sender.run_id is not None:
                self._run_id = self.sender.run_id
        box = [self._run_id, error[0]]
        dist.broadcast_object_list(box, src=0)
        if box[1]:
            raise TrackingUnavailable(box[1])
        self._run_id = box[0]

    @property
    def run_id(self) -> str | None:
        """The MLflow run (on rank 0 the sender's, once the store answered)."""
        if self.sender is not None and self.sender.run_id is not None:
            return self.sender.run_id
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued for the sender; never blocks (a full queue drops the record from MLflow only)."""
        if self.sender is None:
            return
        try:
            self.sender.queue.put_nowait(("metrics", ({k: float(v) for k, v in metrics.items()}, step)))
        except queue.Full:
            if self.sender.dropped == 0:
                log.warning(f"MLflow has not answered for {self.sender.pending()} records (tracking.queue_size): "
                            "later records go to metrics.jsonl only until it catches up")
            self.sender.dropped += 1

    def close(self, status: str = "FINISHED") -> None:
        """End the run: waits up to tracking.close_timeout_s for the backlog, then says what was not sent."""
        sender, self.sender = self.sender, None
        if sender is None:
            return
        sender.deadline = time.time() + self.cfg.close_timeout_s
        for item in (("end", status), _END):
            try:
                sender.queue.put(item, timeout=max(0.0, sender.deadline - time.time()))
            except queue.Full:
                break
        sender.join(max(0.0, sender.deadline - time.time()))
        if sender.is_alive() or sender.pending() or sender.dropped:
            log.warning(f"MLflow did not take {sender.pending() + sender.dropped} records before the end "
                        f"({sender.last_error or 'no answer'}); metrics.jsonl in {self.cfg.run_dir} has them all")


def _run_exists(mlflow, run_id: str) -> bool:
    """Does the store hold `run_id`? (False when it answers that it does not; other errors raise.)"""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            return False
        raise


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
