"""Small building blocks shared by the LM and the cross-attention blocks (plain torch)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalise in fp32, scale in the input dtype (as transformers does, so
    the frozen LM matches its reference bit for bit in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6, shared_weight_grad=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # for a weight every TP rank holds but applies to its own heads only: sums its gradient
        # over the TP ranks (LinearFactory.sum_grad_over_tp), so the copies stay equal
        self.shared_weight_grad = shared_weight_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: one fused kernel on the GPU; on the CPU it decomposes into exactly the
        # operations of x * rsqrt(mean(x^2) + eps) (the same bits: tests/test_model.py)
        x32 = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        weight = self.weight if self.shared_weight_grad is None else self.shared_weight_grad(self.weight)
        return weight * x32.to(x.dtype)


class LinearFactory(Protocol):
    """Builds the projections of an attention/MLP block. `column` splits the output features
    across tensor-parallel ranks, `row` splits the input features and sums the outputs; both
    return a module whose forward gives one tensor. `tp_size` is how many ranks share a block."""

    tp_size: int

    def column(self, in_features: int, out_features: int) -> nn.Module: ...

    def row(self, in_features: int, out_features: int) -> nn.Module: ...

    def sum_grad_over_tp(self, t: torch.Tensor) -> torch.Tensor:
        """Identity forward; the gradient summed over the TP ranks (for a replicated weight that
        each rank applies to its own heads only, e.g. the per-head q/k norms)."""
        ...


class LocalLinears:
    """The single-process factory: plain nn.Linear without bias."""

    tp_size = 1

    def column(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def sum_grad_over_tp(self, t: torch.Tensor) -> torch.Tensor:
        return t


def rope_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and signed-sin tables [B, 1, T, E] for `apply_rope`: transformers' LLaMA convention
    (rotate_half layout, frequencies in fp32), the sin table's first half negated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                              device=position_ids_BT.device).float() / head_dim))
    freqs_BTF = position_ids_BT.float()[..., None] * inv_freq
    sin_BTF = freqs_BTF.sin()
    cos_BTE = torch.cat((freqs_BTF, freqs_BTF), dim=-1).cos()
    return cos_BTE.to(dtype)[:, None], torch.cat((-sin_BTF, sin_BTF), dim=-1).to(dtype)[:, None]


def apply_rope(x_BHTE: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin` in four kernels instead of six:
    rotate_half(x) * sin = cat(-x2, x1) * cat(s, s) = roll(x, E/2) * cat(-s, s), bit for bit
    (negation is exact)."""
    return x_BHTE * cos + x_BHTE.roll(x_BHTE.shape[-1] // 2, dims=-1) * signed_sin
