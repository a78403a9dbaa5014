"""On a real SLURM cluster on this machine (tests/slurm_cluster.py: slurmctld, slurmdbd on
MariaDB, two slurmd "nodes" in network namespaces): 2-node x 1-task CPU debug trainings through
the submitit launcher and through launchers/train.sbatch; preemption by `scancel --signal` saves
one committed checkpoint, requeues, resumes and finishes with the losses of an uninterrupted run
in one MLflow run; a real error fails the job without a requeue."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import shardkit
from slurm_cluster import LocalCluster, unavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    c = LocalCluster(str(tmp_path_factory.mktemp("slurm")))
    c.start()
    yield c
    c.stop()


def train_sets(corpus: str, run_dir: str, *extra: str) -> list[str]:
    sets = [f"data.synthetic_dir={corpus}", f"tracking.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1",
            "train.precision=fp32", "checkpoint.keep_last=2", "data.num_workers=1", *extra]
    return [x for s in sets for x in ("--set", s)]


def launch(cluster, corpus, run_dir, *flags, extra_sets=()):
    cmd = [sys.executable, "launchers/submitit_launch.py", "--deepspeed", "ds_configs/zero2.json",
           *train_sets(corpus, run_dir, *extra_sets), "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
           "--cpus-per-task", "1", "--time", "20", "--signal-lead", "30", "--log-folder",
           os.path.join(run_dir, "slurm"), *flags]
    return subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)


def job_id(text: str) -> str:
    m = re.search(r"submitted job (\d+)", text) or re.search(r"Submitted batch job (\d+)", text)
    assert m, text
    return m.group(1)


def losses(run_dir: str) -> dict[int, float]:
    """Per-step losses of metrics.jsonl (appended across restarts; a step logged twice must agree)."""
    out: dict[int, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            assert out.setdefault(row["step"], row["loss"]) == row["loss"]
    return out


def mlflow_runs(run_dir: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, runs


def wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def sacct(cluster, jid: str) -> tuple[str, int]:
    """(state, restarts) of the job's allocation."""
    out = cluster.slurm("sacct", "-n", "-X", "-P", "-j", jid, "-o", "State,ExitCode").stdout.strip().splitlines()
    state = out[-1].split("|")[0].split()[0] if out else ""
    restarts = cluster.slurm("scontrol", "show", "job", jid, check=False).stdout
    m = re.search(r"Restarts=(\d+)", restarts)
    return state, int(m.group(1)) if m else -1


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def job_finished(cluster, jid: str) -> str | None:
    """The final state once accounting shows the job ended (a requeued job runs again first)."""
    state = sacct(cluster, jid)[0]
    return state if state in ENDED else None


@pytest.fixture(scope="module")
def straight(cluster, synthetic_corpus, tmp_path_factory):
    """An uninterrupted 2-node run through the submitit launcher, waited for and streamed."""
    run_dir = str(tmp_path_factory.mktemp("straight"))
    proc = launch(cluster, synthetic_corpus, run_dir, "--wait")
    return run_dir, proc


def test_submitit_launcher_trains_on_two_nodes(straight):
    run_dir, proc = straight
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = re.search(r"logs (\S+)", proc.stdout).group(1)
    assert os.path.isfile(log), "the log is where the launcher said"
    with open(log) as f:
        text = f.read()
    assert "world 2 = TP 1 x DP 2" in text and f"done: {STEPS} steps" in text
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == STEPS


def _preempt(cluster, run_dir, jid, sig):
    # signal once training is under way (a few steps logged), to every step of the job
    wait_for(lambda: os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) and len(losses(run_dir)) >= 3, 300,
             "training to start")
    cluster.slurm("scancel", f"--signal={sig}", "--full", jid)
    return wait_for(lambda: job_finished(cluster, jid), 400, "the requeued job to finish")


def test_preempted_submitit_job_requeues_resumes_and_matches_the_uninterrupted_run(cluster, synthetic_corpus,
                                                                                   straight, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = launch(cluster, synthetic_corpus, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jid = job_id(proc.stdout)
    state = _preempt(cluster, run_dir, jid, "USR2")
    assert state == "COMPLETED", state
    assert sacct(cluster, jid)[1] == 1  # requeued exactly once
    _check_resumed_run(run_dir, straight[0])


def _check_resumed_run(run_dir, straight_dir):
    with open(os.path.join(run_dir, "slurm_requeues.json")) as f:
        assert json.load(f) == {"preempted": 1, "timed_out": 0}
    assert losses(run_dir) == losses(straight_dir)  # bit-identical on CPU
    _, runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_preempted_sbatch_job_requeues_resumes_and_matches_the_uninterrupted_run(cluster, synthetic_corpus,
                                                                                 straight, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    cmd = ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20", "--signal=USR1@30",
           f"--output={run_dir}/slurm-%j.out", "launchers/train.sbatch", "--deepspeed", "ds_configs/zero2.json",
           *train_sets(synthetic_corpus, run_dir, "slurm.signal_lead_s=30")]
    env = {**cluster.env, "FLAMINGO_PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jid = job_id(proc.stdout)
    state = _preempt(cluster, run_dir, jid, "USR1")
    log = open(os.path.join(run_dir, f"slurm-{jid}.out")).read()
    assert state == "COMPLETED", log[-3000:]
    assert "restart 1" in log and "requeued" in log
    _check_resumed_run(run_dir, straight[0])


def test_a_real_error_fails_the_job_without_requeue(cluster, synthetic_corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    tokenizer = os.path.join(synthetic_corpus, "tokenizer")
    # inputs that pass every start-up check (the launcher refuses a missing shard at once), but
    # whose samples are all unusable (one shard per node's stream): the job finds that out when it
    # reads the data
    (tmp_path / "shards").mkdir()
    for i in range(2):
        shardkit.write_tar(str(tmp_path / "shards" / f"docs-{i:05d}.tar"), [{"__key__": "a", "txt": "no image ."}])
    proc = launch(cluster, synthetic_corpus, run_dir, "--wait",
                  extra_sets=(f"data.shards={tmp_path / 'shards'}", f"data.tokenizer={tokenizer}"))
    assert proc.returncode == 1, proc.stdout[-3000:]
    jid = job_id(proc.stdout)
    assert "FAILED" in proc.stdout
    assert "gave no usable document" in proc.stdout  # the error is in the streamed log
    assert sacct(cluster, jid) == ("FAILED", 0)
