"""The hang watchdog (issue 21): one rank of two hangs in a collective-free spot while the other
waits for it in the step's first all-reduce; both write their stacks and last collective and exit
with status 5 within the limit plus a few seconds; tools/hang_report.py names the stuck rank and
the collective the other waits in; a resume from the last commit ends with the weights of an
uninterrupted run. Also the report's other verdicts, and the straggler metrics."""

import json
import os
import subprocess
import sys
import time

import torch
import torch.multiprocessing as mp
from distributed import _free_port, _worker, run_distributed
from test_trainer import make_trainer, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, HANG_AT, LIMIT_S = 8, 5, 4.0


def _train(layout, corpus, run_dir, hang_at, *sets):
    trainer = make_trainer(layout, corpus, run_dir, 2, f"train.steps={STEPS}", "checkpoint.every_steps=2",
                           f"train.hang_timeout_s={LIMIT_S}", "train.hang_timeout_first_step_s=120", *sets)
    if hang_at:
        step = trainer.train_step

        def hanging_step():  # rank 1 stops before the step's first collective; rank 0 enters it and waits
            if trainer.state.step + 1 == hang_at and layout.rank == 1:
                time.sleep(3600)
            return step()

        trainer.train_step = hanging_step
    trainer.train()
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))] if layout.rank == 0 else []
    return snapshot(trainer.model, True), metrics


def test_a_hung_rank_is_reported_both_exit_and_the_resume_ends_with_the_uninterrupted_weights(synthetic_corpus,
                                                                                              tmp_path):
    run_dir = str(tmp_path / "run")
    out = str(tmp_path / "hung")
    os.makedirs(out)
    ctx = mp.start_processes(_worker, args=(2, _free_port(), 1, _train, (synthetic_corpus, run_dir, HANG_AT), out),
                             nprocs=2, join=False, start_method="spawn")
    t0 = time.time()
    for p in ctx.processes:  # each on its own: spawn's join would stop the second when the first exits
        p.join(timeout=240)
    codes = [p.exitcode for p in ctx.processes]
    assert codes == [5, 5], codes
    hang = os.path.join(run_dir, "hang")
    reports = [json.load(open(os.path.join(hang, f"rank{r}.json"))) for r in range(2)]
    hung_for = [r["seconds_in_phase"] for r in reports]
    assert all(LIMIT_S < s < LIMIT_S + 5 for s in hung_for), hung_for
    assert time.time() - t0 < 120
    for r in range(2):
        stacks = open(os.path.join(hang, f"rank{r}.stacks.txt")).read()
        assert "(main)" in stacks and "hang-watchdog" in stacks
    assert "hanging_step" in open(os.path.join(hang, "rank1.stacks.txt")).read()
    assert reports[0]["collective"]["inside"] and reports[0]["collective"]["name"] == "all_reduce"
    assert reports[0]["phase"] == "step" and reports[0]["step"] == HANG_AT
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "hang_report.py"), run_dir],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    verdict = [line for line in proc.stdout.splitlines() if line.startswith("stuck:")]
    assert verdict == [f"stuck: rank 1 (outside any collective); the others wait for it in all_reduce "
                       f"#{reports[0]['collective']['seq']} over ranks [0, 1] "
                       f"({reports[0]['collective']['bytes']} bytes)"], proc.stdout

    (resumed, _), _ = run_distributed(_train, 2, 1, tmp_path / "resume", synthetic_corpus, run_dir, 0,
                                      "checkpoint.resume=auto")
    assert os.path.isdir(os.path.join(run_dir, "hang")) is False  # set aside for the new run
    (straight, metrics), _ = run_distributed(_train, 2, 1, tmp_path / "straight", synthetic_corpus,
                                             str(tmp_path / "straight-run"), 0)
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # the straggler measure: every logged step names the slowest rank and its own (non-waiting) time
    assert all(m["rank_time/slowest_rank"] in (0.0, 1.0) and m["rank_time/max_s"] >= m["rank_time/min_s"] > 0
               for m in metrics if "loss" in m)


def test_the_report_names_a_rank_on_another_path_and_a_silent_rank(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import hang_report

    d = tmp_path / "hang"
    d.mkdir()

    def write(rank, seq, inside=True):
        c = {"name": "all_reduce", "seq": seq, "group_ranks": [0, 1, 2], "bytes": 8, "inside": inside,
             "seconds_inside": 30.0 if inside else None}
        (d / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": 3, "host": "h", "pid": 1, "phase": "step", "step": 7,
             "seconds_in_phase": 31.0, "limit_s": 30.0, "collective": c, "main_stack": ["x.py:1 in f"]}))

    write(0, 12)
    write(1, 11)
    lines = hang_report.summarize(*hang_report.load(str(tmp_path)))
    assert "no report from ranks [2]" in "\n".join(lines)
    assert lines[-2] == "stuck: every rank waits in a collective, ranks [1] in an earlier one (#11): they took a " \
                        "different path"
    assert hang_report.main([str(tmp_path / "nothing")]) == 2
