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
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.shared_weight_grad is None else self.shared_weight_grad(self.weight)
        return weight * x32.to(dtype)


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, 1, T, E] in transformers' LLaMA convention (rotate_half layout,
    frequencies in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                              device=position_ids_BT.device).float() / head_dim))
    freqs_BTF = position_ids_BT.float()[..., None] * inv_freq
    emb_BTE = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
    return emb_BTE.cos().to(dtype)[:, None], emb_BTE.sin().to(dtype)[:, None]


def apply_rope(x_BHTE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x_BHTE * cos + rotate_half(x_BHTE) * sin
