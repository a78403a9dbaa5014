"""Frozen vision encoder: an open_clip ViT returning IDEFICS-style features.

IDEFICS cross-attends to the ViT's token sequence *before* the final LayerNorm, CLS token
included (transformers' IdeficsVisionTransformer returns `last_hidden_state` without
`post_layernorm`). open_clip's default output is post-LayerNorm and pooled, and that LayerNorm
cannot be folded into the resampler, so we take the last block's tokens through
`forward_intermediates`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


class VisionEncoder(nn.Module):
    """Wraps an open_clip `VisionTransformer`; always runs without autograd."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "class_embedding"):
            raise ValueError(f"vision tower {type(visual).__name__} is not an open_clip ViT")
        self.visual = visual
        self.width: int = visual.class_embedding.shape[-1]
        self.image_size: int = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size

    def shape(self) -> dict:
        """Width, depth, heads, MLP width, patch and image size (for FLOP counts and export)."""
        v = self.visual
        block = v.transformer.resblocks[0]
        return {"width": self.width, "layers": len(v.transformer.resblocks), "heads": block.attn.num_heads,
                "mlp": block.mlp.c_fc.out_features, "patch_size": v.conv1.kernel_size[0],
                "image_size": self.image_size}

    @torch.no_grad()
    def forward(self, pixels_BCP: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, S, V] with S = 1 + patches (CLS first)."""
        dtype = self.visual.conv1.weight.dtype
        out = self.visual.forward_intermediates(
            pixels_BCP.to(dtype), indices=1, stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)


def register_model_config(model_name: str) -> None:
    """Make our own open_clip model configs (`flamingo-*`, in flamingo_dist/assets) known to open_clip."""
    import open_clip

    if model_name.startswith("flamingo-"):
        open_clip.add_model_config(os.path.join(_ASSETS, f"{model_name}.json"))


def build_vision_encoder(model_name: str, pretrained: str | None, activation: str,
                         device: str = "cpu") -> VisionEncoder:
    """Create the open_clip model by name (our debug ViT included) and keep its vision tower.
    `pretrained` is a local weights file or None (random init); nothing is downloaded.
    `device="meta"`: shapes only (the capacity planner)."""
    import open_clip

    register_model_config(model_name)
    if model_name not in open_clip.list_models():
        raise ValueError(f"model.vision.model_name: open_clip knows no model {model_name!r}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"model.vision.pretrained: {pretrained} is not a file")
    model = open_clip.create_model(model_name, pretrained=pretrained,
                                   force_quick_gelu=(activation == "quick_gelu"), device=device)
    return VisionEncoder(model.visual)
