"""The one ordered function that turns a pure model into a training engine:
freeze -> activation checkpointing -> compile -> optimizer/schedule -> DeepSpeed engine.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch
from torch import nn

from flamingo_dist.config.schema import JobConfig
from flamingo_dist.models.flamingo import Flamingo
from flamingo_dist.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


def apply_freeze(model: Flamingo) -> None:
    """Everything frozen except the model's trainable modules (resampler, cross-attention blocks,
    decoupled embeddings): frozen weights get no gradient and never reach the optimizer."""
    model.requires_grad_(False)
    for module in model.trainable_modules():
        module.requires_grad_(True)
    model.vision.eval()  # no dropout/droppath in the frozen tower


def apply_activation_checkpointing(model: Flamingo) -> None:
    for layer in model.layers:
        layer.activation_checkpointing = True


def apply_compile(model: Flamingo) -> None:
    import torch._dynamo

    # megatron's TP linears break the graph inside a unit, and their frames are recompiled per
    # weight shape and per frozen/trainable (the LM layer's four, the block's seven): more than
    # dynamo's default of 8 per frame, past which it would silently run them eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.layers:
        layer.compile_unit()


def apply_deepspeed(model: nn.Module, cfg: JobConfig, ds_config: dict, mpu):
    import deepspeed

    from flamingo_dist.training.checkpoint import universal_info

    # saved in every checkpoint, so it can be resumed at another TP size (checkpoint.py)
    model.universal_checkpoint_info = universal_info(model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, mpu=mpu)
    return engine


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning each large block to the
    kernel: a CPU step allocates the same large buffers every time (the gradients, DeepSpeed's
    flat gradient partition), and with glibc's defaults every block above its mmap threshold
    (at most 32 MiB) is a fresh mapping whose pages fault in again on first touch: DeepSpeed's
    flattening of the gradients took 55 ms instead of 17 ms per step in tools/bench_openflamingo.py's
    shape. Resident memory then stays near its peak. Returns whether it applied (glibc on Linux
    only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        log.debug("no glibc mallopt: host allocator left as it is")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def parallelize(model: Flamingo, cfg: JobConfig, ds_config: dict, mpu):
    # the device rule of distributed.groups.init_distributed: CUDA when visible. The model is
    # still on the CPU here either way (megatron's CPU initialisation; DeepSpeed moves it), so its
    # parameters cannot tell: on a GPU the host keeps nothing but what building left behind.
    if cfg.train.cpu_keep_freed_memory and not torch.cuda.is_available():
        keep_freed_host_memory()
    apply_freeze(model)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    return apply_deepspeed(model, cfg, ds_config, mpu)
