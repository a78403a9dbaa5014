"""Tanh-gated cross-attention dense block (Alayrac et al. 2022, Sec. 2.2, Fig. 4), with the
semantics of transformers' `IdeficsGatedCrossAttentionLayer`:

    x = x + tanh(alpha_xattn) * zero_if_no_image(XAttn(RMSNorm(x), media))
    x = x + tanh(alpha_dense) * SwiGLU(RMSNorm(x))

q comes from the text (width D), k/v from the resampled media (width V); heads = LM heads.
Gates start at 0 (the paper's choice and the default; `alpha_init` changes it for the ablation in
docs/learning.md), so at initialisation the model is exactly the frozen LM. Each text token
attends only to the latents of the image its `image_attention_mask` row selects; a token with no
image gets a zero cross-attention output (transformers PR #26839) but still passes the MLP.

Projections come from a `LinearFactory`, so the same block is sharded by tensor parallelism
(heads and MLP columns split across ranks) when the LM module hands it megatron's layers.
"""

from __future__ import annotations

import torch
from torch import nn

from flamingo_dist.models.common import LinearFactory, LocalLinears, RMSNorm


def expand_image_mask(image_attention_mask_BTN: torch.Tensor, num_latents: int, dtype: torch.dtype):
    """[B, T, N] 0/1 -> additive attention bias [B, 1, T, N*L] and a per-token gate [B, T].
    Disallowed keys get the dtype's minimum (not -inf) so fully masked rows stay finite, as in
    transformers' IDEFICS; their output is zeroed by the gate."""
    allowed_BTNL = image_attention_mask_BTN.bool().repeat_interleave(num_latents, dim=-1)
    bias = torch.zeros(allowed_BTNL.shape, dtype=dtype, device=allowed_BTNL.device)
    bias = bias.masked_fill(~allowed_BTNL, torch.finfo(dtype).min)
    return bias[:, None], image_attention_mask_BTN.bool().any(dim=-1)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, hidden_size: int, vision_width: int, num_heads: int, intermediate_size: int,
                 eps: float = 1e-6, alpha_type: str = "float", qk_layer_norms: bool = False,
                 linears: LinearFactory | None = None, alpha_init: float = 0.0):
        super().__init__()
        linears = linears or LocalLinears()
        if num_heads % linears.tp_size or intermediate_size % linears.tp_size:
            raise ValueError(f"tensor-parallel size {linears.tp_size} must divide the heads ({num_heads}) "
                             f"and the MLP width ({intermediate_size})")
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // linears.tp_size
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.q_proj = linears.column(hidden_size, num_heads * self.head_dim)
        self.k_proj = linears.column(vision_width, num_heads * self.head_dim)
        self.v_proj = linears.column(vision_width, num_heads * self.head_dim)
        self.o_proj = linears.row(num_heads * self.head_dim, hidden_size)
        self.qk_layer_norms = qk_layer_norms
        if qk_layer_norms:
            # one weight for all heads, while a TP rank sees only its heads: gradient summed over TP
            self.q_layer_norm = RMSNorm(self.head_dim, eps, linears.sum_grad_over_tp)
            self.k_layer_norm = RMSNorm(self.head_dim, eps, linears.sum_grad_over_tp)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.gate_proj = linears.column(hidden_size, intermediate_size)
        self.up_proj = linears.column(hidden_size, intermediate_size)
        self.down_proj = linears.row(intermediate_size, hidden_size)
        shape = (1,) if alpha_type == "float" else (1, 1, hidden_size)
        self.alpha_cross_attn = nn.Parameter(torch.full(shape, float(alpha_init)))
        self.alpha_dense = nn.Parameter(torch.full(shape, float(alpha_init)))

    def media_kv(self, media_BMV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the media [B, H, M, E] (computed once per prompt in generation)."""
        B, M, _ = media_BMV.shape
        k_BHME = self.k_proj(media_BMV).view(B, M, self.local_heads, self.head_dim).transpose(1, 2)
        v_BHME = self.v_proj(media_BMV).view(B, M, self.local_heads, self.head_dim).transpose(1, 2)
        if self.qk_layer_norms:
            k_BHME = self.k_layer_norm(k_BHME)
        return k_BHME, v_BHME

    def forward(self, x_BTD: torch.Tensor, media_BMV: torch.Tensor, mask_bias_B1TM: torch.Tensor,
                has_image_BT: torch.Tensor, media_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """media_BMV: resampled media of the sequence, M = N images x L latents; media_kv: its
        keys and values when already computed (generation)."""
        B, T, _ = x_BTD.shape
        h = self.input_layernorm(x_BTD)
        q_BHTE = self.q_proj(h).view(B, T, self.local_heads, self.head_dim).transpose(1, 2)
        k_BHME, v_BHME = media_kv if media_kv is not None else self.media_kv(media_BMV)
        if self.qk_layer_norms:
            q_BHTE = self.q_layer_norm(q_BHTE)
        attn_BHTE = nn.functional.scaled_dot_product_attention(
            q_BHTE, k_BHME, v_BHME, attn_mask=mask_bias_B1TM.to(q_BHTE.dtype))
        attn_BTD = self.o_proj(attn_BHTE.transpose(1, 2).reshape(B, T, -1))
        attn_BTD = attn_BTD.masked_fill(~has_image_BT[:, :, None], 0.0)
        x_BTD = x_BTD + torch.tanh(self.alpha_cross_attn).to(x_BTD.dtype) * attn_BTD
        h = self.post_attention_layernorm(x_BTD)
        mlp_BTD = self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return x_BTD + torch.tanh(self.alpha_dense).to(x_BTD.dtype) * mlp_BTD
