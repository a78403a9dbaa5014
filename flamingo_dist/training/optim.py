"""AdamW with weight-decay groups, and the warm-up + cosine/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from flamingo_dist.config.schema import TrainConfig

_NO_DECAY = ("norm", "alpha_", "latents", "bias", "new_embed", "embed", "frame_embs")
def lr_group(name: str) -> str:
    """Which train.lr_scales entry (config.LR_GROUPS) a trainable parameter follows."""
    if "alpha_" in name:
        return "gates"
    if name.startswith("resampler."):
        return "resampler"
    if ".xattn." in name:
        return "xattn"
    return "embeddings"  # the decoupled embeddings and head of the new tokens


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict | None = None) -> list[dict]:
    """Trainable parameters only: decay on projection matrices; none on norms, gates, biases,
    resampler latents and embeddings (decaying those only shrinks them towards zero). Each group
    carries `lr_scale` (train.lr_scales of its parameters' kind; groups with the same scale and
    decay are one group, so the default is two groups: decay, no decay)."""
    scales = lr_scales or {}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim < 2 or any(k in name for k in _NO_DECAY) else weight_decay
        groups.setdefault((float(scales.get(lr_group(name), 1.0)), decay), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[1] == 0.0, k[0]))  # the base rate with decay first
    return [{"params": groups[k], "weight_decay": k[1], "lr_scale": k[0]} for k in order]


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel over each of DeepSpeed's flat parameter partitions, on CPU
    and GPU): the unfused one cost 0.43 s of a 1.62 s step of the OpenFlamingo comparison shape on
    CPU (docs/benchmarks.md); the same update to rounding (tests/test_optim.py)."""
    groups = [dict(g, lr=t.lr * g["lr_scale"]) for g in param_groups(model, t.weight_decay, t.lr_scales)]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)


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
