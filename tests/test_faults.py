"""Faults that must never cost more than the last checkpoint (issue 20; docs/operations.md): a
planted pickle never runs and is refused naming the file, in our files and in DeepSpeed's; a
resume with a changed model is one line naming the fields; a garbage commit marker counts as
uncommitted and `--resume auto` falls back; partial step folders are listed and removed; SIGTERM
to the `deepspeed` runner, to one rank and to the group (and under torchrun, and Ctrl-C to a plain
process) saves a committed checkpoint and the resume is bit-identical; one run per directory; an
MLflow server killed mid-run, unreachable at start, or deleted before a resume costs no step and
no metric; a full disk is one line and keeps the previous checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from distributed import capture_logs, run_distributed
from test_trainer import make_trainer


class _Planted:
    """Unpickling this runs a shell command (what a planted file would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(checkpoint_dir: str, rel: str, marker: str) -> None:
    """Replace `rel` by a pickle that runs code, its hash written into the commit marker (anyone who
    can write the folder can do both)."""
    from flamingo_dist.training import checkpoint

    path = os.path.join(checkpoint_dir, rel)
    original = torch.load(path, weights_only=False)  # our own, trusted: rewritten with the payload inside
    original["planted"] = _Planted(marker)
    torch.save(original, path)
    marker_file = os.path.join(checkpoint_dir, checkpoint.COMMIT)
    with open(marker_file) as f:
        commit = json.load(f)
    commit["files"][rel] = checkpoint._sha256(path)
    with open(marker_file, "w") as f:
        json.dump(commit, f)


def _planted_pickles(layout, corpus, run_dir, marker_dir):
    from flamingo_dist.training import checkpoint

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=4")
    trainer.train_step()
    saved = trainer.save_checkpoint()
    del trainer
    out = {}
    for rel in ("rank0.pt", "ds/mp_rank_00_model_states.pt"):
        marker = os.path.join(marker_dir, rel.replace("/", "_") + ".ran")
        backups = {}
        for name in (rel, checkpoint.COMMIT):
            with open(os.path.join(saved, name), "rb") as f:
                backups[name] = f.read()
        _plant(saved, rel, marker)
        try:
            make_trainer(layout, corpus, run_dir, 2, "train.steps=4", "checkpoint.resume=auto")
            out[rel] = {"error": None}
        except checkpoint.CheckpointError as e:
            out[rel] = {"error": str(e)}
        out[rel]["ran"] = os.path.exists(marker)
        for name, content in backups.items():  # the genuine files back, for the next case
            with open(os.path.join(saved, name), "wb") as f:
                f.write(content)
    try:  # a resume with a changed model: refused before the model is built, naming what changed
        make_trainer(layout, corpus, run_dir, 2, "train.steps=4", "checkpoint.resume=auto", "model.resampler.depth=1",
                     "model.xattn.cross_layer_interval=2")
        out["changed"] = None
    except checkpoint.CheckpointError as e:
        out["changed"] = str(e)
    logs = []  # a changed data order is allowed, and named in one warning
    capture_logs("flamingo_dist.training.resume_config", logs)
    make_trainer(layout, corpus, run_dir, 2, "train.steps=4", "checkpoint.resume=auto", "train.seed=7")
    out["data_order"] = [line for line in logs if "data order differs" in line]
    return out


def test_a_planted_pickle_never_runs_and_is_refused(synthetic_corpus, tmp_path):
    (out,) = run_distributed(_planted_pickles, 1, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"),
                             str(tmp_path))
    changed = out.pop("changed")
    data_order = out.pop("data_order")
    assert len(data_order) == 1 and "train.seed: 1234 -> 7" in data_order[0], data_order
    assert changed is not None and "\n" not in changed
    assert "model.resampler.depth: 2 -> 1" in changed and "before layers [0, 1] -> [0]" in changed, changed
    for rel, r in out.items():
        assert not r["ran"], f"{rel}: the planted code ran"
        assert r["error"] is not None, f"{rel}: the tampered checkpoint was loaded"
        assert os.path.basename(rel) in r["error"] and "refused to load" in r["error"], r["error"]
        assert "\n" not in r["error"]


def _garbage_marker(layout, corpus, run_dir):
    from flamingo_dist.training import checkpoint

    trainer = make_trainer(layout, corpus, run_dir, 1, "train.steps=4")
    trainer.train_step()
    good = trainer.save_checkpoint()
    trainer.train_step()
    late = trainer.save_checkpoint()
    logs = []
    capture_logs("flamingo_dist.training.checkpoint", logs)
    out = {"good": good}
    for name, content in (("garbage", "{not json"), ("empty", ""), ("no files", '{"step": 2}')):
        with open(os.path.join(late, checkpoint.COMMIT), "w") as f:
            f.write(content)
        out[name] = checkpoint.resolve_resume("auto", os.path.join(run_dir, "checkpoints"))
    out["logs"] = logs
    return out


def test_a_garbage_commit_marker_falls_back_to_the_previous_checkpoint(synthetic_corpus, tmp_path):
    (out,) = run_distributed(_garbage_marker, 1, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    for name in ("garbage", "empty", "no files"):
        assert out[name] == out["good"], name
    warnings = [line for line in out["logs"] if "unreadable commit marker" in line]
    assert len(warnings) == 3, out["logs"]



def _partial_folder(layout, corpus, run_dir):
    from flamingo_dist.training import checkpoint

    trainer = make_trainer(layout, corpus, run_dir, 1, "train.steps=4")
    trainer.train_step()
    trainer.save_checkpoint()
    leftover = checkpoint.step_dir(os.path.join(run_dir, "checkpoints"), 2)  # a save at step 2 cut short
    os.makedirs(os.path.join(leftover, "ds"))
    with open(os.path.join(leftover, "ds", "part.pt"), "wb") as f:
        f.write(b"\0" * 300_000)
    logs = []
    capture_logs("flamingo_dist.training.trainer", logs)
    trainer = make_trainer(layout, corpus, run_dir, 1, "train.steps=4", "checkpoint.resume=auto")
    listed = [line for line in logs if "partial checkpoint folder" in line]
    trainer.train_step()
    trainer.train_step()
    trainer.save_checkpoint()  # step 3 commits: the older partial folder goes (in the background)
    t0 = time.time()
    while os.path.exists(leftover) and time.time() - t0 < 10:
        time.sleep(0.05)
    return listed, os.path.exists(leftover), trainer.state.step


def test_a_partial_step_folder_is_listed_at_start_and_removed_after_a_newer_commit(synthetic_corpus, tmp_path):
    ((listed, still_there, step),) = run_distributed(_partial_folder, 1, 1, tmp_path / "out", synthetic_corpus,
                                                     str(tmp_path / "run"))
    assert len(listed) == 1 and "step_00000002 (0.3 MB)" in listed[0], listed
    assert step == 3 and not still_there


# ---------------------------------------------------------------- stop signals, real launchers
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STEPS = 40  # a couple of seconds of training: signalled at step >= 3, it stops long before the end


def _launch(run_dir, corpus, port, *extra, launcher="deepspeed"):
    """The user's command under the `deepspeed` launcher (2 ranks on CPU), in its own process group."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    head = {"deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", str(port)],
            "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", str(port)],
            "python": [sys.executable]}[launcher]
    cmd = [*head, "flamingo_dist/train.py", "--deepspeed", "ds_configs/zero2.json",
           "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=2", "--set", f"data.synthetic_dir={corpus}",
           "--set", f"tracking.run_dir={run_dir}", "--set", "tracking.mlflow=false", "--set", "train.stop_grace_s=45",
           "--set", "checkpoint.at_end=false", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _ranks(proc):
    """The training processes (and their loader workers) under the launcher."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True)]


def _wait_for(cond, timeout, what):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_corpus, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    proc = _launch(run_dir, synthetic_corpus, 29711)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return _losses(run_dir)


def _train_until_running(run_dir, corpus, port, launcher="deepspeed"):
    proc = _launch(run_dir, corpus, port, launcher=launcher)
    _wait_for(lambda: os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) and len(_losses(run_dir)) >= 3, 240,
              "training to start")
    return proc


@pytest.mark.parametrize("target", ["launcher", "one rank", "group"])
def test_sigterm_saves_a_committed_checkpoint_and_the_resume_is_bit_identical(target, uninterrupted,
                                                                               synthetic_corpus, tmp_path):
    """SIGTERM to the `deepspeed` runner (which exits at once and leaves its ranks: they notice
    their launcher is gone), to one rank, or to the whole process group (`timeout`, a terminal;
    sent twice):
    every case ends with a committed checkpoint, exit status 4 (stopped, resumable) and no process
    left within the grace period; `--resume auto` then finishes the run bit-identically."""
    from flamingo_dist.training import checkpoint

    run_dir = str(tmp_path / "run")
    port = 29712 + ["launcher", "one rank", "group"].index(target) * 3
    proc = _train_until_running(run_dir, synthetic_corpus, port)
    procs = _ranks(proc) + [psutil.Process(proc.pid)]
    trainers = [p for p in procs if "train.py" in " ".join(p.cmdline()) and p.pid != proc.pid
                and "deepspeed" not in p.cmdline()[1]]
    t0 = time.time()
    if target == "launcher":
        os.kill(proc.pid, signal.SIGTERM)
    elif target == "one rank":
        os.kill(max(trainers, key=lambda p: p.pid).pid, signal.SIGTERM)
    else:  # twice: the second arrives while the first is being served and must not cut the save short
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    _, alive = psutil.wait_procs(procs, timeout=max(1.0, 60 - (time.time() - t0)))
    assert not alive, f"still running {time.time() - t0:.0f}s after the signal: {[p.cmdline() for p in alive]}"
    committed = checkpoint.committed(os.path.join(run_dir, "checkpoints"))
    assert len(committed) == 1, out[-3000:]
    stopped_at = max(_losses(run_dir))
    assert stopped_at < STEPS and committed[0].endswith(f"step_{stopped_at:08d}"), out[-3000:]
    # the runner passes on its ranks' status (4: stopped with a committed checkpoint), unless the
    # signal reached the runner itself, which then dies of it
    assert proc.returncode == (4 if target == "one rank" else -signal.SIGTERM), out[-3000:]
    resumed = _launch(run_dir, synthetic_corpus, port + 1, "--resume", "auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert _losses(run_dir) == uninterrupted


# ---------------------------------------------------------------- one run per directory
def _hold_lock(run_dir):
    code = ("import sys, time; from flamingo_dist.training.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, run_dir], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_live_directory_is_refused_in_one_line(synthetic_corpus, tmp_path):
    """A live run (another process holding the lock) refuses `--resume auto` into its directory
    with one line naming it; once that process is gone its lock is taken over with a warning."""
    from flamingo_dist.training.run_lock import LOCK, RunLock

    run_dir = str(tmp_path / "run")
    holder = _hold_lock(run_dir)
    try:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run([sys.executable, "-m", "flamingo_dist.train", "--deepspeed", "ds_configs/zero2.json",
                               "--set", "train.steps=2", "--set", f"data.synthetic_dir={synthetic_corpus}",
                               "--set", f"tracking.run_dir={run_dir}", "--set", "tracking.mlflow=false",
                               "--resume", "auto"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "in use by another run" in errors[0] and f"pid {holder.pid} on" in errors[0], errors[0]
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))  # nothing of the holder's was touched
    logs = []
    capture_logs("flamingo_dist.training.run_lock", logs)
    lock = RunLock(run_dir).acquire()  # the holder was killed: its lock is stale on this host
    assert any("taking over" in line and "its process has ended" in line for line in logs), logs
    lock.release()
    assert not os.path.exists(os.path.join(run_dir, LOCK))


def test_a_lock_on_another_host_is_stale_only_without_heartbeat_and_a_requeued_job_takes_its_own():
    from flamingo_dist.training.run_lock import STALE_AFTER_S, _holder_gone

    me = {"host": "here", "pid": 1, "slurm_job_id": "77"}
    other = {"host": "there", "pid": 5, "start_time": 0.0, "slurm_job_id": None}
    assert _holder_gone(other, 10.0, me) is None
    assert "heartbeat" in _holder_gone(other, STALE_AFTER_S + 1, me)
    assert "requeued" in _holder_gone({**other, "slurm_job_id": "77"}, 10.0, me)
    assert _holder_gone({**other, "host": "here", "pid": os.getpid(),
                         "start_time": psutil.Process().create_time()}, 1e6, me) is None  # alive here


# ---------------------------------------------------------------- tracking outages
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(port: int, db: str) -> subprocess.Popen:
    """`mlflow server` on an sqlite store, in its own process group; returns once it answers."""
    import urllib.request

    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.time() - t0 > 90 or proc.poll() is not None:
            raise RuntimeError("mlflow server did not start")
        time.sleep(0.2)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tracked_trainer(layout, corpus, run_dir, *sets):
    """A trainer with MLflow tracking as train.py builds it, and the wall time each step spent
    outside train_step (logging, tracking) recorded."""
    from flamingo_dist.training.tracking import Tracker

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=12", *sets)
    trainer.cfg.tracking.mlflow = True
    t0 = time.time()
    trainer.tracker = Tracker(trainer.cfg.tracking, trainer.cfg, layout, run_name="outage")
    start_s = time.time() - t0
    step, gaps, last_end = trainer.train_step, [], [None]

    def timed_step():
        if last_end[0] is not None:
            gaps.append(time.time() - last_end[0])
        out = step()
        last_end[0] = time.time()
        return out

    trainer.train_step = timed_step
    return trainer, start_s, gaps


def _server_dies_mid_run(layout, corpus, run_dir, port, db, server_pid):
    trainer, _, gaps = _tracked_trainer(layout, corpus, run_dir, f"tracking.tracking_uri=http://127.0.0.1:{port}",
                                        "tracking.close_timeout_s=90")
    step, restarted = trainer.train_step, []

    def outage_step():  # the server is killed before step 4 and comes back before step 9
        if trainer.state.step == 3:
            _kill_group(server_pid)
        if trainer.state.step == 8:
            restarted.append(subprocess.Popen([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri",
                                               f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port),
                                               "--workers", "1"], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
        return step()

    trainer.train_step = outage_step
    trainer.train()
    run_id = trainer.tracker.run_id
    trainer.close()
    return {"gaps": gaps, "run_id": run_id, "server": restarted[0].pid}


def test_an_mlflow_server_killed_mid_run_costs_no_step_and_no_metric(synthetic_corpus, tmp_path):
    """The server dies after step 3 and is back (after its ~6 s start) only once training ended:
    no step waits for it (< 2 s outside the step), metrics.jsonl has all 12 steps, and the
    records it missed reach it on reconnection (replayed by the background sender)."""
    import mlflow

    port, db = _free_port(), str(tmp_path / "server.db")
    server = _mlflow_server(port, db)
    run_dir = str(tmp_path / "run")
    try:
        (out,) = run_distributed(_server_dies_mid_run, 1, 1, tmp_path / "out", synthetic_corpus, run_dir, port, db,
                                 server.pid)
    finally:
        _kill_group(server.pid)
    try:
        assert max(out["gaps"]) < 2.0, out["gaps"]
        assert sorted(_losses(run_dir)) == list(range(1, 13))
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
        assert [m.step for m in client.get_metric_history(out["run_id"], "loss")] == list(range(1, 13))
        assert client.get_run(out["run_id"]).info.status == "FINISHED"
    finally:
        _kill_group(out["server"])


def _store_unreachable(layout, corpus, run_dir, port):
    from flamingo_dist.training.tracking import TrackingUnavailable

    out = {}
    logs = []
    capture_logs("flamingo_dist.training.tracking", logs)
    uri = f"tracking.tracking_uri=http://127.0.0.1:{port}"
    trainer, out["start_s"], out["gaps"] = _tracked_trainer(layout, corpus, run_dir, uri, "tracking.start_timeout_s=3",
                                                            "tracking.close_timeout_s=2")
    trainer.train()
    trainer.close()
    out["logs"] = list(logs)
    t0 = time.time()
    try:
        _tracked_trainer(layout, corpus, run_dir + "-required", uri, "tracking.start_timeout_s=3",
                         "tracking.required=true")
        out["required"] = None
    except TrackingUnavailable as e:
        out["required"] = str(e)
    out["required_s"] = time.time() - t0
    return out


def test_an_unreachable_store_at_start_is_a_warning_and_required_tracking_an_error(synthetic_corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    (out,) = run_distributed(_store_unreachable, 1, 1, tmp_path / "out", synthetic_corpus, run_dir, _free_port())
    assert out["start_s"] < 3 + 2 and max(out["gaps"]) < 2.0, out
    assert sorted(_losses(run_dir)) == list(range(1, 13))
    assert any("did not start the run within 3s" in line for line in out["logs"]), out["logs"]
    assert any("metrics.jsonl" in line and "did not take" in line for line in out["logs"]), out["logs"]
    assert out["required"] is not None and "tracking.required" in out["required"] and "\n" not in out["required"]
    assert out["required_s"] < 3 + 10  # the wait, plus a trainer build


def _tracked_run(layout, corpus, run_dir, steps, *sets):
    from flamingo_dist.training.tracking import Tracker

    trainer = make_trainer(layout, corpus, run_dir, 2, f"train.steps={steps}", *sets)
    trainer.cfg.tracking.mlflow = True
    trainer.tracker = Tracker(trainer.cfg.tracking, trainer.cfg, layout, run_name="run", run_id=trainer.run_id)
    trainer.train()
    trainer.close()
    return trainer.tracker.run_id


def test_a_resume_whose_mlflow_run_is_gone_starts_a_new_run_linked_to_the_old(synthetic_corpus, tmp_path):
    """The store is deleted (the checkpoints intact): the resume logs to a new run tagged with the
    old id, instead of failing with MLflow's "Run with id=... not found"."""
    import mlflow

    run_dir = str(tmp_path / "run")
    (first,) = run_distributed(_tracked_run, 1, 1, tmp_path / "a", synthetic_corpus, run_dir, 2,
                               "checkpoint.every_steps=2")
    os.remove(os.path.join(run_dir, "mlflow.db"))
    (second,) = run_distributed(_tracked_run, 1, 1, tmp_path / "b", synthetic_corpus, run_dir, 4,
                                "checkpoint.resume=auto")
    assert first and second and first != second
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db").get_run(second)
    assert run.data.tags["resumed_from_run_id"] == first and run.info.status == "FINISHED"
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4]


# ---------------------------------------------------------------- a full disk
def _tmpfs_works(mount: str) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"],
                           capture_output=True)
    return probe.returncode == 0


def _train_on_small_disk(tmp_path, corpus, mib: int, steps: int = 6):
    """The user's entry point (one process) with its checkpoints on a `mib` MiB tmpfs, mounted in a
    private mount namespace (`unshare -rm`); then, in the same namespace, what is committed there."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _tmpfs_works(str(disk)):
        pytest.skip("no tmpfs: unshare -rm cannot mount here (needs user namespaces or root)")
    ckpt = str(disk / "checkpoints")
    train = [sys.executable, "-m", "flamingo_dist.train", "--deepspeed", "ds_configs/zero2.json",
             "--set", f"train.steps={steps}", "--set", f"data.synthetic_dir={corpus}",
             "--set", f"tracking.run_dir={tmp_path / 'run'}", "--set", "tracking.mlflow=false",
             "--set", f"checkpoint.dir={ckpt}", "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=0"]
    check = ("import sys, json, os; from flamingo_dist.training import checkpoint as c; "
             "done = c.committed(sys.argv[1]); "
             "ok = [all(c._sha256(os.path.join(p, f)) == h for f, h in "
             "json.load(open(os.path.join(p, c.COMMIT)))['files'].items()) for p in done]; "
             "print('COMMITTED', [p.rsplit('/', 1)[1] for p in done], 'INTACT', all(ok), "
             "'PARTIAL', len(c.partial(sys.argv[1])))")
    script = (f'mount -t tmpfs -o size={mib}m tmpfs {disk} && "$@"; echo "TRAIN_RC=$?"; '
              f'{sys.executable} -c "{check}" {ckpt}')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *train], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    rc = int(proc.stdout.split("TRAIN_RC=")[1].split()[0])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return rc, errors, proc.stdout.split("TRAIN_RC=")[1], proc.stderr


def test_a_full_disk_before_a_save_is_one_line_and_keeps_the_previous_checkpoint(synthetic_corpus, tmp_path):
    """On a real 3 MiB tmpfs (the test skips, saying so, where it cannot mount one): step 2's
    checkpoint (~2 MB) fits, step 4's would not: the run stops before writing it with one line
    naming the path and the bytes, and step 2 is still committed and verifies."""
    rc, errors, after, stderr = _train_on_small_disk(tmp_path, synthetic_corpus, 3)
    assert rc == 1 and len(errors) == 1, stderr[-3000:]
    assert "no space for checkpoint" in errors[0] and "step_00000004" in errors[0] and "bytes free" in errors[0]
    assert "Traceback" not in stderr
    assert "COMMITTED ['step_00000002'] INTACT True PARTIAL 0" in after, after


def test_a_disk_that_fills_during_a_save_is_one_line_and_leaves_nothing_half_written(synthetic_corpus, tmp_path):
    """On a 1 MiB tmpfs the first checkpoint does not fit: the write fails (torch says "file write
    failed", no errno), which is one line saying no space is left, naming the path; the partial
    folder is removed and nothing counts as committed."""
    rc, errors, after, stderr = _train_on_small_disk(tmp_path, synthetic_corpus, 1)
    assert rc == 1 and len(errors) == 1, stderr[-3000:]
    assert "no space left on the device" in errors[0] and "step_00000002" in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert "COMMITTED [] INTACT True PARTIAL 0" in after, after


@pytest.mark.parametrize("launcher,sig", [("torchrun", signal.SIGTERM), ("python", signal.SIGINT)])
def test_a_stop_signal_under_torchrun_and_to_a_plain_process_saves_too(launcher, sig, synthetic_corpus, tmp_path):
    """SIGTERM to torchrun's process group, and Ctrl-C (SIGINT) to a plain `python` run: a committed
    checkpoint at the step where they stopped, nothing left running, no KeyboardInterrupt traceback."""
    from flamingo_dist.training import checkpoint

    run_dir = str(tmp_path / "run")
    proc = _train_until_running(run_dir, synthetic_corpus, 29730 + (launcher == "python"), launcher=launcher)
    procs = _ranks(proc) + [psutil.Process(proc.pid)]
    t0 = time.time()
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    _, alive = psutil.wait_procs(procs, timeout=max(1.0, 60 - (time.time() - t0)))
    assert not alive, [p.cmdline() for p in alive]
    committed = checkpoint.committed(os.path.join(run_dir, "checkpoints"))
    stopped_at = max(_losses(run_dir))
    assert len(committed) == 1 and committed[0].endswith(f"step_{stopped_at:08d}") and stopped_at < STEPS, out[-3000:]
    assert "KeyboardInterrupt" not in out
    if launcher == "python":
        assert proc.returncode == 4, out[-3000:]



def test_a_signal_after_training_ended_ends_the_process_at_once(tmp_path):
    """Once training is over (finished, stopped after its save, or failed) a signal is no longer a
    stop-and-save: a launcher that kills the remaining ranks after one failed (srun
    --kill-on-bad-exit, deepspeed's launch) must not leave them waiting for a step boundary that
    never comes (seen: a failed SLURM job's surviving rank lived on for the 10-minute grace)."""
    code = ("import os, signal, time; from flamingo_dist.distributed.slurm import StopFlag; "
            "f = StopFlag().install(); f.arm(); f.disarm(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - t0 < 20, (proc.returncode, proc.stderr)
    assert "stopped by SIGTERM after training ended" in proc.stderr
