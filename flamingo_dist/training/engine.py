"""The one ordered function that turns a pure model into a training engine:
freeze -> activation checkpointing -> optimizer/schedule -> DeepSpeed engine.
"""

from __future__ import annotations

from torch import nn

from flamingo_dist.config.schema import JobConfig
from flamingo_dist.models.flamingo import Flamingo
from flamingo_dist.training.optim import build_optimizer, build_scheduler


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


def parallelize(model: Flamingo, cfg: JobConfig, ds_config: dict, mpu):
    apply_freeze(model)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return apply_deepspeed(model, cfg, ds_config, mpu)
