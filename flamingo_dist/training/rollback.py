"""Loss-spike rollback (issue 21; `train.spike_rollback`, docs/operations.md for the rule and
why a running median).

`SpikeDetector` judges each step's loss, as every rank learned it from the step's one read (the
same number everywhere: the ranks agree without a collective). `roll_back` takes the trainer back
to the newest committed checkpoint before the spike; the data feed goes on where it is, so the
data read in between is skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import statistics
import time

from flamingo_dist.config.schema import TrainConfig, checkpoint_dir
from flamingo_dist.training.state import TrainingStopped, TrainState


class SpikeDetector:
    """Keeps the last `spike_window` step losses (spikes left out) and the current run of
    spiking steps."""

    def __init__(self, t: TrainConfig) -> None:
        self.t = t
        self.losses: collections.deque = collections.deque(maxlen=t.spike_window)
        self.spiking: list[int] = []

    def observe(self, state, loss: float) -> tuple[str, int] | None:
        """After step `state.step`: (why, the first spiking step) when a rollback is due, else None."""
        t = self.t
        if state.consecutive_skipped >= t.max_consecutive_skipped_steps:
            return (f"{state.consecutive_skipped} steps in a row with a non-finite loss or gradient",
                    state.step - state.consecutive_skipped + 1)
        if not math.isfinite(loss):
            return None  # a skipped step: counted above
        if len(self.losses) >= t.spike_min_history:
            median = statistics.median(self.losses)
            if loss > t.spike_factor * median:
                self.spiking.append(state.step)
                if len(self.spiking) >= t.spike_steps:
                    return (f"loss {loss:.4g} above {t.spike_factor:g} x the running median {median:.4g} for "
                            f"{len(self.spiking)} step(s)", self.spiking[0])
                return None
        self.spiking = []
        self.losses.append(loss)
        return None


def roll_back(trainer, why: str, first_bad: int) -> None:
    """Collective: `trainer` back to the newest committed checkpoint before step `first_bad`,
    skipping the data read since; the loop limit (train.max_rollbacks per rollback_window_steps)
    stops the run in one line."""
    from flamingo_dist.training import checkpoint

    t, st = trainer.cfg.train, trainer.state
    bad = st.step
    recent = [s for s in trainer._rollback_at if trainer._steps_run - s < t.rollback_window_steps]
    if len(recent) >= t.max_rollbacks:
        raise TrainingStopped(f"step {bad}: {why}, and {len(recent)} rollbacks already happened in the last "
                              f"{t.rollback_window_steps} steps (train.max_rollbacks {t.max_rollbacks}); stopping. "
                              "Lower train.lr or look at the data after the last checkpoint.")
    before = [p for p in checkpoint.committed(checkpoint_dir(trainer.cfg))
              if int(os.path.basename(p).split("_")[1]) < first_bad]
    if not before:
        raise TrainingStopped(f"step {bad}: {why}, but no committed checkpoint before step {first_bad} to roll back "
                              "to (train.spike_rollback needs checkpoint.every_steps or every_minutes, and "
                              "checkpoint.keep_last >= 2)")
    slot_now = trainer.feed.slots()
    with trainer._watched("rollback"):
        meta = checkpoint.rollback(trainer, before[-1])
    fields = {f.name for f in dataclasses.fields(TrainState)} - {"rollbacks"}
    trainer.state = TrainState(**{k: v for k, v in meta.items() if k in fields}, rollbacks=st.rollbacks + 1)
    trainer._rollback_at.append(trainer._steps_run)
    trainer.spikes.spiking = []
    trainer._last_save = (trainer.state.step, time.time())
    record = {"rollback/from_step": float(bad), "rollback/to_step": float(trainer.state.step),
              "rollback/skipped_slots_from": float(meta["data"]["slots"]),
              "rollback/skipped_slots_to": float(slot_now), "rollbacks": float(trainer.state.rollbacks)}
    trainer.log(f"rollback {trainer.state.rollbacks}: step {bad}: {why}; back to {before[-1]} (step "
                f"{trainer.state.step}); skipping data slots {meta['data']['slots']}..{slot_now - 1}, read by steps "
                f"{trainer.state.step + 1}..{bad}")
    trainer._write_metrics(record)
    if trainer.tracker is not None:
        trainer.tracker.log_metrics(record, bad)
