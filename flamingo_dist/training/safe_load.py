"""Loading checkpoints without running their code.

`torch.load(weights_only=False)` unpickles a file in full: any callable it names runs. A file
planted in a checkpoint folder (with its hash written into the plain-JSON commit marker) ran
`os.system` on `--resume auto` (issue 20). Inside `safe_loading()` every `torch.load` of the
process, DeepSpeed's own included (it passes `weights_only=False` in its checkpoint engine,
stage 3, ds_to_universal), is forced to `weights_only=True`: tensors, containers, numbers and
strings, plus the few plain-data classes DeepSpeed pickles into its optimizer states (allow-listed
below: they hold numbers, run nothing). Anything else is refused with one line naming the file.

    with safe_loading():
        engine.load_checkpoint(...)
"""

from __future__ import annotations

import contextlib
import os
import pickle

import torch

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it in every torch.load


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that needs more than plain data to load."""


def allowed_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoints, all plain data: the ZeRO stage
    enum and the loss scaler's settings in every optimizer state file, the fragment addresses of
    ZeRO-1/2's parameter slices; and numpy's array reconstruction, which checkpoints of
    flamingo_dist before 2026-12-05 used for the numpy RNG state (now stored as a tensor)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


@contextlib.contextmanager
def safe_loading():
    """Every torch.load inside loads data only; a file that needs more raises
    UnsafeCheckpointError naming it."""
    original = torch.load
    previous = os.environ.get(FORCE)

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                          str(e).splitlines()[0])
            raise UnsafeCheckpointError(
                f"{f}: refused to load: it needs more than tensors and numbers to unpickle ({reason}); "
                "flamingo_dist and DeepSpeed never write such a file, so it was replaced or planted: "
                "resume from another checkpoint or remove this one") from None

    os.environ[FORCE] = "1"
    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        torch.load = original
        if previous is None:
            os.environ.pop(FORCE, None)
        else:
            os.environ[FORCE] = previous
