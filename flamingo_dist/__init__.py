"""flamingo_dist: Flamingo-style vision-language training on a tensor-parallel frozen LM.

Subpackages, each importing only from those listed before it (tests/test_layout.py checks it):

- ``config``: the typed job config (schema), loading and validation, flavors, the resolved
  DeepSpeed JSON, the generated field reference. No torch.
- ``data``: shard reading, the four formats, decoding, IDEFICS' token layout, packing, the
  resumable streams and the data feed; the synthetic corpus.
- ``models``: the Flamingo model (tensor-parallel frozen LLaMA, vision encoder, Perceiver
  Resampler, gated cross-attention), FLOP counts.
- ``hf``: Hugging Face formats: LLaMA checkpoint loading, IDEFICS export and import.
- ``demo``: the synthetic backbones and the learning report of `make demo`.
- ``distributed``: process groups (Megatron's parallel state, DeepSpeed's mpu), SLURM
  environment, stop signal and requeue.
- ``eval``: few-shot evaluation, scorers, generation, held-out attribute accuracy.
- ``training``: model assembly (build), the DeepSpeed engine and optimizer, the Trainer,
  checkpoints, tracking, start-up checks of the inputs.

``train.py`` is the entry point (`deepspeed flamingo_dist/train.py --deepspeed ...`).
"""

import logging
import os
import sys

__version__ = "0.1.0"


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


def setup_logging(level: int = logging.INFO) -> None:
    """The package's module loggers (`logging.getLogger(__name__)` under "flamingo_dist") print
    to stdout as `[flamingo_dist] message`, from rank 0 only (every rank runs the same code).
    Called by the entry points (train.py, tools); idempotent."""
    root = logging.getLogger("flamingo_dist")
    root.setLevel(level)
    if not any(getattr(h, "_flamingo", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler._flamingo = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("[flamingo_dist] %(message)s"))
        handler.addFilter(_RankZero())
        root.addHandler(handler)
        root.propagate = False
