"""Loss-spike rollback (issue 21): a planted spike (one step's loss scaled x50 on every rank)
triggers exactly one rollback to the checkpoint before it, the data read in between is skipped
(and only that), and the run ends back on track with `rollbacks == 1`; with rollback off the same
run does not roll back; a spike that keeps coming stops the run at the limit with one line."""

import json
import os

from distributed import run_distributed
from test_trainer import make_trainer

STEPS, SPIKE_AT = 14, 7  # checkpoints every 2 steps: the spike at step 7 goes back to step 6


def _run(layout, corpus, run_dir, spike_at, persistent, *sets):
    from flamingo_dist.training.trainer import TrainingStopped

    trainer = make_trainer(layout, corpus, run_dir, 2, f"train.steps={STEPS}", "checkpoint.every_steps=2",
                           "checkpoint.keep_last=3", "train.spike_min_history=4", "train.spike_steps=1", *sets)
    forward = trainer._forward

    def spiky(batch):  # keyed on the steps this process ran, so a rolled-back step 7 runs clean
        loss, stats = forward(batch)
        n = trainer._steps_run
        if spike_at and (n == spike_at or persistent and n >= spike_at):
            loss = loss * 50.0
        return loss, stats

    trainer._forward = spiky
    error = None
    try:
        trainer.train()
    except TrainingStopped as e:
        error = str(e)
    records = []
    if layout.rank == 0:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return {"rollbacks": trainer.state.rollbacks, "step": trainer.state.step, "slots": trainer.feed.slots(),
            "records": records, "error": error}


def _rank0(tmp_path, name, corpus, *args):
    return run_distributed(_run, 2, 1, tmp_path / name, corpus, str(tmp_path / name / "run"), *args)[0]


def test_a_spike_rolls_back_once_skips_its_data_and_the_run_ends_on_track(synthetic_corpus, tmp_path):
    on = _rank0(tmp_path, "on", synthetic_corpus, SPIKE_AT, False, "train.spike_rollback=true")
    straight = _rank0(tmp_path, "straight", synthetic_corpus, 0, False, "train.spike_rollback=true")
    off = _rank0(tmp_path, "off", synthetic_corpus, SPIKE_AT, False)
    assert on["error"] is None and on["step"] == STEPS and on["rollbacks"] == 1
    (rb,) = [r for r in on["records"] if "rollback/from_step" in r]
    assert (rb["rollback/from_step"], rb["rollback/to_step"]) == (SPIKE_AT, SPIKE_AT - 1)
    # the skipped data is exactly what steps 7 read: 2 ranks x 1 micro-batch, after the 6 x 2 of step 6
    assert (rb["rollback/skipped_slots_from"], rb["rollback/skipped_slots_to"]) == (12, 14)
    assert on["slots"] == straight["slots"] + 2
    losses = [r["loss"] for r in on["records"] if "loss" in r]
    spike = max(losses)
    assert spike > 10 * min(losses)  # the planted spike is in the curve, once
    final = [r["loss"] for r in on["records"] if "loss" in r][-3:]
    reference = [r["loss"] for r in straight["records"] if "loss" in r][-3:]
    assert abs(sum(final) - sum(reference)) / sum(reference) < 0.3, (final, reference)
    assert [r for r in on["records"] if "loss" in r][-1]["rollbacks"] == 1.0
    assert straight["rollbacks"] == 0 and off["rollbacks"] == 0 and off["step"] == STEPS
    assert not [r for r in off["records"] if "rollback/from_step" in r]
    assert max(r["loss"] for r in off["records"] if "loss" in r) > 10 * min(losses)  # the spike stayed


def test_a_spike_that_keeps_coming_stops_at_the_rollback_limit_in_one_line(synthetic_corpus, tmp_path):
    out = _rank0(tmp_path, "loop", synthetic_corpus, SPIKE_AT, True, "train.spike_rollback=true",
                 "train.max_rollbacks=2")
    assert out["rollbacks"] == 2 and out["error"] is not None and "\n" not in out["error"]
    assert "2 rollbacks already happened" in out["error"] and "train.max_rollbacks" in out["error"]


def test_the_detector_judges_against_the_median_of_the_losses_before_the_spike():
    """The running median leaves spikes out of the history (a mean would be dragged by them), a
    run of spike_steps spiking steps is named by its first, and one normal step resets the run."""
    from types import SimpleNamespace

    from flamingo_dist.config.schema import TrainConfig
    from flamingo_dist.training.rollback import SpikeDetector

    det = SpikeDetector(TrainConfig(spike_min_history=3, spike_steps=2, spike_factor=3.0, spike_window=4))

    def at(step, loss, skipped=0):
        return det.observe(SimpleNamespace(step=step, consecutive_skipped=skipped), loss)

    assert [at(s, x) for s, x in enumerate([1.0, 0.9, 0.8, 5.0, 0.7], 1)] == [None] * 5  # one spike, then normal
    assert at(6, 9.0) is None and list(det.losses) == [1.0, 0.9, 0.8, 0.7]  # the spikes never entered
    why, first = at(7, 9.0)
    assert first == 6 and "above 3 x the running median 0.85 for 2 step(s)" in why
    assert at(8, 0.6) is None and list(det.losses) == [0.9, 0.8, 0.7, 0.6]  # a window of 4
    assert at(9, float("nan"), skipped=5)[1] == 5  # non-finite for max_consecutive_skipped_steps (5): from step 5
