"""The stop signal without a cluster: ranks agree at a step boundary and save one committed
checkpoint together; the requeue decision; SLURM variables -> torch's."""

import os
import signal

from distributed import run_distributed
from test_trainer import make_trainer


def _stop_case(layout, corpus, run_dir):
    from flamingo_dist.distributed.slurm import StopFlag
    from flamingo_dist.training import checkpoint

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=6", "checkpoint.keep_last=0")
    trainer.stop_flag = StopFlag().install()
    forward = trainer._forward

    def forward_then_signal(batch):  # only rank 1 is signalled, in step 2's forward (before its one read)
        out = forward(batch)
        if trainer.state.step + 1 == 2 and layout.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer._forward = forward_then_signal
    state = trainer.train()
    committed = [os.path.basename(p) for p in checkpoint.committed(os.path.join(run_dir, "checkpoints"))]
    return trainer.stopped, state.step, committed


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(synthetic_corpus, tmp_path):
    for stopped, step, committed in run_distributed(_stop_case, 2, 1, tmp_path / "out", synthetic_corpus,
                                                    str(tmp_path / "run")):
        assert stopped and step == 2
        assert committed == ["step_00000002"]


def test_preemptions_requeue_without_limit_and_timeouts_up_to_the_setting(tmp_path):
    from flamingo_dist.distributed.slurm import decide_requeue

    run = str(tmp_path)
    for _ in range(5):  # a preemption: plenty of time left
        assert decide_requeue(run, 180, 1, time_left_s=3600)[0]
    ok, why = decide_requeue(run, 180, 1, time_left_s=100)
    assert ok and "time limit" in why and "time-outs 1" in why
    ok, why = decide_requeue(run, 180, 1, time_left_s=100)
    assert not ok and "max_timeout_requeues" in why
    assert decide_requeue(run, 180, 1, time_left_s=None)[0]  # no limit: a preemption


def test_slurm_variables_become_torch_distributed_ones(monkeypatch):
    from flamingo_dist.distributed import slurm

    monkeypatch.setattr(os, "environ", dict(os.environ))  # export_torch_env writes os.environ: keep it here
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ["RANK"] = "0"  # stale, inherited from the submitting shell: SLURM's value wins
    monkeypatch.setenv("MASTER_ADDR", "node7")  # set by the user: kept (no scontrol needed)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    got = slurm.export_torch_env()
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "node7", "MASTER_PORT": str(slurm.master_port("4242"))}
    assert os.environ["RANK"] == "5"
    assert 20000 <= slurm.master_port("4242") < 40000


def test_dataloader_workers_ignore_the_stop_signal():
    from flamingo_dist.distributed.slurm import STOP_SIGNALS, ignore_stop_signals

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_launcher_dry_run_prints_the_sbatch_script_and_bad_input_fails_before_submitting(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "launchers/submitit_launch.py", "--deepspeed", "ds_configs/zero2.json", "--nodes", "2",
           "--gpus-per-node", "8", "--cpus-per-task", "12", "--mem", "0", "--partition", "gpu", "--account", "proj",
           "--qos", "high", "--constraint", "h100", "--time", "4320", "--exclusive", "--sbatch", "reservation=r1",
           "--job-name", "fl", "--log-folder", str(tmp_path / "logs"), "--dry-run",
           "--set", "parallel.tensor_parallel_size=2"]
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=0", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --time=4320", "#SBATCH --exclusive",
                 "#SBATCH --reservation=r1", "#SBATCH --job-name=fl", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
                 "--kill-on-bad-exit=1", "trap '' USR2"):
        assert line in script, line
    for bad, message in ((["--nodes", "0"], "--nodes"), (["--set", "parallel.tensor_parallel_size=3"], "tensor_parallel"),
                         (["--deepspeed", "nowhere.json"], "nowhere.json")):
        bad_out = subprocess.run([*cmd, *bad], cwd=repo, capture_output=True, text=True, timeout=120)
        assert bad_out.returncode == 2 and "error:" in bad_out.stderr and message in bad_out.stderr, bad_out.stderr
