"""The trainer's counters and its stop signal, apart from the trainer so that its helpers
(rollback.py) can use them without importing it."""

from __future__ import annotations

from dataclasses import dataclass


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, say); the message says why."""


@dataclass
class TrainState:
    step: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    tokens_seen: int = 0
    rollbacks: int = 0  # loss-spike rollbacks so far (train.spike_rollback)
