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

    # at TP>1 megatron's linears break the graph inside a unit, and their frames are recompiled
    # per weight shape and per frozen/trainable (the LM layer's four, the block's seven): more
    # than dynamo's default of 8 per frame, past which it would silently run them eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.layers:
        layer.compile_unit()


class Trainables(nn.Module):
    """What DeepSpeed is given: the model's trainable modules under the model's own parameter
    names (`resampler.*`, `layers.<i>.xattn.*`, `lm.new_embed.*`, `lm.new_head.*`), its forward
    the whole model's. DeepSpeed partitions, casts and moves every parameter of the module it is
    given and has no way to leave some out: given the whole model, ZeRO-3 partitioned the frozen
    ViT and LM across data parallelism and gathered them in every forward and backward (issue 19:
    4x ZeRO-2's step on one H200). Given this, the frozen weights stay as they were built (TP-sharded,
    replicated across data parallelism, in their precision), and checkpoints hold the same names."""

    def __init__(self, model: Flamingo):
        super().__init__()
        object.__setattr__(self, "model", model)  # not registered: its frozen weights are not DeepSpeed's
        self.resampler = model.resampler
        self.layers = model.layers  # FlamingoLayer registers its xattn block only (the decoder is the LM's)
        self.lm = nn.Module()
        for name, module in model.lm.named_children():
            if module in model.lm.trainable_modules():
                self.lm.add_module(name, module)
        names = {n for n, p in self.named_parameters()}
        wanted = {n for n, p in model.named_parameters() if p.requires_grad}
        if names != wanted:
            raise RuntimeError(f"internal: the trainable view holds {sorted(names ^ wanted)[:5]} differently "
                               "from the model's trainable parameters")
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in model.parameters_used_outside_their_module():  # ZeRO-3: gathered for the whole forward
            register_external_parameter(self, p)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def zero3_leaf_classes() -> list[type]:
    """The trainable blocks ZeRO-3 gathers whole (DeepSpeed's "leaf modules": one fetch and one
    release per block call instead of one per norm and linear inside it). On the debug flavor at
    DP=2 this took ZeRO-3's step from 1.43x ZeRO-2's to 1.23x (docs/benchmarks.md); on a GPU each
    block is one large all-gather rather than a dozen small ones."""
    from flamingo_dist.models.resampler import ResamplerAttention, ResamplerMLP
    from flamingo_dist.models.xattn import GatedCrossAttentionBlock

    return [GatedCrossAttentionBlock, ResamplerAttention, ResamplerMLP]


def zero3_thresholds(model: Flamingo) -> dict[str, int]:
    """ZeRO-3's "auto" settings from the model's real shapes (ds_configs/README.md):
    - stage3_param_persistence_threshold: 0. The small tensors (norms, gates) sit inside the
      trainable blocks, which ZeRO-3 gathers whole (`zero3_leaf_classes`), so keeping them whole
      saves no collective; and DeepSpeed 0.19.8 re-gathers every persistent tensor after each
      optimizer step with a collective of its own (10 x the LM width, Hugging Face's rule, cost
      the debug flavor 13% of its step on gloo, and 3b would launch ~150 such all-gathers a step);
    - stage3_prefetch_bucket_size: the parameters of the largest trainable block (a
      cross-attention block or a resampler layer), so the next one is fetched while this one runs."""
    blocks = [layer.xattn for layer in model.layers if layer.xattn is not None] + list(model.resampler.blocks)
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    return {"stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": int(largest)}


def fill_zero3_auto(ds_config: dict, model: Flamingo) -> dict:
    """`ds_config` with ZeRO-3's "auto" thresholds filled (other values are left as they are)."""
    zero = ds_config.get("zero_optimization", {})
    for key, value in zero3_thresholds(model).items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds_config


def apply_deepspeed(model: Flamingo, cfg: JobConfig, ds_config: dict, mpu, device: torch.device):
    import deepspeed

    from flamingo_dist.training.checkpoint import universal_info

    if cfg.train.zero3_partition_frozen:
        module = model  # everything partitioned under ZeRO-3 (the option's cost: docs/config.md)
    else:
        model.to(device)  # DeepSpeed moves only what it is given
        module = Trainables(model)
    # saved in every checkpoint, so it can be resumed at another TP size (checkpoint.py)
    module.universal_checkpoint_info = universal_info(module)
    optimizer = build_optimizer(module, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(module, zero3_leaf_classes())
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=fill_zero3_auto(ds_config, model), mpu=mpu)
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


def parallelize(model: Flamingo, cfg: JobConfig, ds_config: dict, mpu, device: torch.device):
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
    return apply_deepspeed(model, cfg, ds_config, mpu, device)
