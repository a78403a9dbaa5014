"""Build a Flamingo model from its config: the one place that wires vision, resampler, LM and
cross-attention blocks together and initialises (or loads) their weights.

Initialisation is layout-invariant: replicated modules come from the same seed on every rank,
TP-sharded trainable matrices are drawn full-size from a seeded generator and sliced, and the
frozen LM is loaded (or drawn) in Hugging Face layout and sliced by `hf_llama`. So TP=1 and
TP=2 build the same function, and the first-step loss agrees across layouts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flamingo_dist.config.schema import ModelConfig, xattn_layer_indices
from flamingo_dist.hf.import_idefics import build_idefics_vision, load_idefics_weights
from flamingo_dist.hf.llama import RandomLM, SafetensorsDir, load_lm_weights
from flamingo_dist.models.flamingo import Flamingo
from flamingo_dist.models.lm import TPLinears, TPLlama
from flamingo_dist.models.resampler import PerceiverResampler
from flamingo_dist.models.vision import build_vision_encoder
from flamingo_dist.models.xattn import GatedCrossAttentionBlock

INIT_STD = 0.02  # transformers' IDEFICS initializer_range


def init_sharded_linears_(module: nn.Module, generator: torch.Generator, tp_rank: int, tp_size: int) -> None:
    """Draw every projection weight (`*_proj.weight`) of `module` at full size from `generator`
    and keep this rank's slice, so the result does not depend on the TP size."""
    for name, p in module.named_parameters():
        if not name.endswith("_proj.weight"):
            continue
        dim = getattr(p, "partition_dim", 0) if getattr(p, "tensor_model_parallel", False) else 0
        parts = tp_size if getattr(p, "tensor_model_parallel", False) else 1
        full_shape = list(p.shape)
        full_shape[dim] *= parts
        full = torch.randn(full_shape, generator=generator) * INIT_STD
        with torch.no_grad():
            p.copy_(full.chunk(parts, dim=dim)[tp_rank if parts > 1 else 0])


def assemble_model(cfg: ModelConfig, vision: nn.Module, tp_group: dist.ProcessGroup, dtype: torch.dtype) -> Flamingo:
    """The modules around `vision`, with their default initialisation (on the meta device under
    `torch.device("meta")`: the capacity planner's shapes, training/plan.py). Creation order is
    fixed: the resampler and the blocks draw from the global generator."""
    r = cfg.resampler
    resampler = PerceiverResampler(vision.width, r.depth, r.num_heads, r.head_dim, r.num_latents, r.qk_layer_norms,
                                   r.max_frames)
    lm = TPLlama(cfg.lm, tp_group, dtype)
    linears = TPLinears(tp_group, torch.float32)  # trainable: fp32 here, DeepSpeed decides their dtype
    blocks = {i: GatedCrossAttentionBlock(cfg.lm.hidden_size, vision.width, cfg.lm.num_heads, cfg.lm.intermediate_size,
                                          cfg.lm.rms_norm_eps, cfg.xattn.alpha_type, cfg.xattn.qk_layer_norms, linears,
                                          cfg.xattn.alpha_init)
              for i in xattn_layer_indices(cfg)}
    model = Flamingo(vision, resampler, lm, blocks, r.num_latents)
    model.packed_attention = cfg.packed_attention
    return model


def build_model(cfg: ModelConfig, tp_group: dist.ProcessGroup, seed: int,
                dtype: torch.dtype = torch.float32) -> Flamingo:
    """The whole model on CPU; frozen parts are created directly in `dtype`. Weights: from
    cfg.init_from (an IDEFICS checkpoint), else the LM from cfg.lm.path or a seeded random LM
    and fresh trainable blocks. Call `resolve_model_config` first."""
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    torch.manual_seed(seed)  # replicated modules: identical on every rank and layout
    if cfg.init_from:
        vision = build_idefics_vision(cfg.init_from, cfg.vision.activation).to(dtype)
    else:
        vision = build_vision_encoder(cfg.vision.model_name, cfg.vision.pretrained, cfg.vision.activation).to(dtype)
    model = assemble_model(cfg, vision, tp_group, dtype)
    lm = model.lm
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lm.new_embed.weight.copy_(torch.randn(lm.new_embed.weight.shape, generator=gen) * INIT_STD)
        if lm.new_head is not None:
            lm.new_head.weight.copy_(torch.randn(lm.new_head.weight.shape, generator=gen) * INIT_STD)
    for i, block in model.xattn_blocks():
        init_sharded_linears_(block, torch.Generator().manual_seed(seed + 100 + i), tp_rank, tp_size)
    if cfg.init_from:
        load_idefics_weights(model, cfg)
    else:
        source = SafetensorsDir(cfg.lm.path) if cfg.lm.path else RandomLM(cfg.lm, seed + 2)
        load_lm_weights(lm, source)
    # every frozen tensor in `dtype` (the LM's norms are made in fp32); DeepSpeed, which is given the
    # trainable modules only (training/engine.py), decides theirs
    trainable = {id(p) for m in model.trainable_modules() for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in trainable and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def resolve_model_config(cfg: ModelConfig) -> list[str]:
    """Point model.lm.path and model.vision.pretrained at built synthetic backbones (the field is
    then cleared: a checkpoint's config names the weights it used), and fill shapes from the
    checkpoints the config points at; returns notes on replaced values."""
    from flamingo_dist.demo.backbones import use_backbones
    from flamingo_dist.hf.import_idefics import resolve_idefics_config
    from flamingo_dist.hf.llama import resolve_lm_config

    notes = use_backbones(cfg) if cfg.synthetic_backbones else []
    return notes + (resolve_idefics_config(cfg) if cfg.init_from else resolve_lm_config(cfg.lm))
