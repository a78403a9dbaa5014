"""Perceiver Resampler (Alayrac et al. 2022, Sec. 2.1), in transformers' IDEFICS layout so its
weights export by renaming: each block attends latents -> cat(media, latents) with separate
LayerNorms for the two, then a LayerNorm -> Linear(4V) -> ReLU -> Linear MLP without bias."""

from __future__ import annotations

import torch
from torch import nn


class ResamplerAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, head_dim: int, qk_layer_norms: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.context_layer_norm = nn.LayerNorm(width, eps=1e-5)
        self.latents_layer_norm = nn.LayerNorm(width, eps=1e-5)
        self.qk_layer_norms = qk_layer_norms
        if qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(head_dim, eps=1e-5)
            self.k_layer_norm = nn.LayerNorm(head_dim, eps=1e-5)
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(num_heads * head_dim, width, bias=False)

    def forward(self, context_BSV: torch.Tensor, latents_BLV: torch.Tensor) -> torch.Tensor:
        context_BSV = self.context_layer_norm(context_BSV)
        latents_BLV = self.latents_layer_norm(latents_BLV)
        kv_in = torch.cat([context_BSV, latents_BLV], dim=-2)
        B = context_BSV.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q_BHLE, k_BHSE, v_BHSE = heads(self.q_proj(latents_BLV)), heads(self.k_proj(kv_in)), heads(self.v_proj(kv_in))
        if self.qk_layer_norms:
            q_BHLE, k_BHSE = self.q_layer_norm(q_BHLE), self.k_layer_norm(k_BHSE)
        out = nn.functional.scaled_dot_product_attention(q_BHLE, k_BHSE, v_BHSE)
        return self.output_proj(out.transpose(1, 2).flatten(-2))


class ResamplerMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=1e-5)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.act = nn.ReLU()
        self.c_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    """[B, S, V] vision tokens -> [B, L, V] latents. With `max_frames`, also videos:
    `add_time` gives each frame's tokens its learned time embedding (Flamingo's video input);
    the frames are then resampled together as one [B, F*S, V] context."""

    def __init__(self, width: int, depth: int, num_heads: int, head_dim: int, num_latents: int,
                 qk_layer_norms: bool = False, max_frames: int = 0):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, width))
        if max_frames:
            self.frame_embs = nn.Parameter(torch.zeros(max_frames, width))
        self.blocks = nn.ModuleList(
            nn.ModuleList([ResamplerAttention(width, num_heads, head_dim, qk_layer_norms), ResamplerMLP(width)])
            for _ in range(depth))
        self.layer_norm = nn.LayerNorm(width, eps=1e-5)

    def add_time(self, frames_BFSV: torch.Tensor) -> torch.Tensor:
        """[B, F, S, V] frame tokens -> [B, F*S, V] with each frame's time embedding added."""
        F = frames_BFSV.shape[1]
        if not hasattr(self, "frame_embs") or F > self.frame_embs.shape[0]:
            have = self.frame_embs.shape[0] if hasattr(self, "frame_embs") else 0
            raise ValueError(f"a video of {F} frames, but the resampler has time embeddings for {have} "
                             "(model.resampler.max_frames)")
        return (frames_BFSV + self.frame_embs[:F, None].to(frames_BFSV.dtype)).flatten(1, 2)

    def forward(self, context_BSV: torch.Tensor) -> torch.Tensor:
        latents_BLV = self.latents.to(context_BSV.dtype).expand(context_BSV.shape[0], -1, -1)
        for attn, mlp in self.blocks:
            latents_BLV = attn(context_BSV, latents_BLV) + latents_BLV
            latents_BLV = mlp(latents_BLV) + latents_BLV
        return self.layer_norm(latents_BLV)
