"""AdamW with weight-decay groups, and the warm-up + cosine/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from flamingo_dist.config import TrainConfig

_NO_DECAY = ("norm", "alpha_", "latents", "bias", "new_embed", "embed", "frame_embs")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only: decay on projection matrices; none on norms, gates, biases,
    resampler latents and embeddings (decaying those only shrinks them towards zero)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in _NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, t.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, foreach=False)


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of train.lr for the optimizer step with 0-based index `step`."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    decay_steps = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
