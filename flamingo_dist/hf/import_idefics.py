"""Start from a released IDEFICS checkpoint (transformers' `IdeficsForVisionText2Text`
directory): its config sets our model shapes, and every weight is loaded, TP-sliced per rank.

The inverse of `export_idefics`: the LM tensors already carry LLaMA names and go through
`hf_llama.load_lm_weights`; the decoupled rows come from `additional_embedding` /
`additional_fc`; cross-attention block j goes before layer j * interval; the HF CLIP vision
tower becomes an open_clip ViT built from the same shape. Every checkpoint tensor must be used.
"""

from __future__ import annotations

import json
import os

import torch

from flamingo_dist.config.schema import ModelConfig
from flamingo_dist.hf.export_idefics import vision_names, xattn_name
from flamingo_dist.hf.llama import CheckpointError, SafetensorsDir, load_lm_weights

_LM_PREFIXES = ("model.embed_tokens.weight", "model.layers.", "model.norm.weight", "lm_head.weight")


def read_idefics_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"model.init_from: {cfg_file} is missing")
    with open(cfg_file) as f:
        hf = json.load(f)
    if hf.get("model_type") != "idefics":
        raise CheckpointError(f"{cfg_file}: model_type {hf.get('model_type')!r} is not 'idefics'")
    per = hf.get("perceiver_config", {})
    problems = []
    if not hf.get("use_resampler", per.get("use_resampler", False)):
        problems.append("use_resampler false (we always resample)")
    if hf.get("additional_vocab_size", 2) != 2:
        problems.append(f"additional_vocab_size {hf.get('additional_vocab_size')} (need 2)")
    if hf.get("vision_config", {}).get("layer_norm_eps", 1e-5) != 1e-5:
        problems.append("vision layer_norm_eps other than 1e-5")
    if problems:
        raise CheckpointError(f"{cfg_file}: unsupported " + ", ".join(problems))
    return hf


def resolve_idefics_config(cfg: ModelConfig) -> list[str]:
    """Replace the shape fields of cfg by those of cfg.init_from's config.json; returns notes."""
    hf = read_idefics_config(cfg.init_from)
    rope = hf.get("rope_parameters") or {}
    per, vis = hf["perceiver_config"], hf["vision_config"]
    values = {
        "lm.vocab_size": hf["vocab_size"], "lm.hidden_size": hf["hidden_size"],
        "lm.intermediate_size": hf["intermediate_size"], "lm.num_layers": hf["num_hidden_layers"],
        "lm.num_heads": hf["num_attention_heads"], "lm.num_kv_heads": None,
        "lm.rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "lm.rms_norm_eps": hf["rms_norm_eps"], "lm.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "lm.max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "xattn.cross_layer_interval": hf["cross_layer_interval"], "xattn.placement": "idefics",
        "xattn.alpha_type": hf["alpha_type"], "xattn.qk_layer_norms": hf["qk_layer_norms"],
        "resampler.num_latents": per["resampler_n_latents"], "resampler.depth": per["resampler_depth"],
        "resampler.num_heads": per["resampler_n_heads"], "resampler.head_dim": per["resampler_head_dim"],
        "resampler.qk_layer_norms": per.get("qk_layer_norms_perceiver", False),
        "vision.activation": vis.get("hidden_act", "gelu"),
        "vision.model_name": "idefics", "vision.pretrained": None,
    }
    notes = []
    for key, value in values.items():
        section, name = key.split(".")
        obj = getattr(cfg, section)
        if getattr(obj, name) != value:
            notes.append(f"model.{key}: {getattr(obj, name)!r} -> {value!r} (from {cfg.init_from}/config.json)")
            setattr(obj, name, value)
    return notes


def build_idefics_vision(path: str, activation: str):
    """An open_clip ViT with the shape of the checkpoint's vision tower (weights loaded later)."""
    from open_clip.model import _build_vision_tower

    from flamingo_dist.models.vision import VisionEncoder

    v = read_idefics_config(path)["vision_config"]
    width, heads = v["embed_dim"], v["num_attention_heads"]
    visual = _build_vision_tower(embed_dim=width, quick_gelu=activation == "quick_gelu", vision_cfg=dict(
        layers=v["num_hidden_layers"], width=width, head_width=width // heads,
        mlp_ratio=v["intermediate_size"] / width, patch_size=v["patch_size"], image_size=v["image_size"]))
    return VisionEncoder(visual)


class _Filtered:
    """A TensorSource showing only some names of another (the LM's, for load_lm_weights)."""

    def __init__(self, source: SafetensorsDir, keep):
        self.source, self.keep, self.path = source, keep, source.path

    def names(self) -> set[str]:
        return {n for n in self.source.names() if self.keep(n)}

    def shape(self, name: str):
        return self.source.shape(name)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.source.read(name, dim, start, stop)


def load_idefics_weights(model, cfg: ModelConfig) -> None:
    """Load every weight of cfg.init_from into `model` (this rank's TP slices)."""
    src = SafetensorsDir(cfg.init_from)
    names, used = src.names(), set()

    def full(name: str) -> torch.Tensor:
        if name not in names:
            raise CheckpointError(f"{cfg.init_from}: tensor {name} is missing")
        used.add(name)
        return src.read(name, 0, 0, src.shape(name)[0])

    def put(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise CheckpointError(f"{cfg.init_from}: {what} has shape {list(value.shape)}, expected {list(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    lm = model.lm
    is_lm = lambda n: n.startswith(_LM_PREFIXES)  # noqa: E731
    load_lm_weights(lm, _Filtered(src, is_lm))
    used |= {n for n in names if is_lm(n)}
    put(lm.new_embed.weight, full("model.embed_tokens.additional_embedding.weight"), "additional_embedding")
    if lm.new_head is not None:
        put(lm.new_head.weight, full("lm_head.additional_fc.weight"), "lm_head.additional_fc")
    else:
        used.add("lm_head.additional_fc.weight")  # tied to additional_embedding
    # vision tower
    visual = model.vision.visual
    for ours, theirs in vision_names(len(visual.transformer.resblocks)).items():
        put(visual.get_parameter(ours), full(theirs), theirs)
    for i, block in enumerate(visual.transformer.resblocks):
        d = f"model.vision_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            packed = torch.cat([full(d + f"{x}_proj.{kind}") for x in ("q", "k", "v")])
            put(getattr(block.attn, f"in_proj_{kind}"), packed, d + f"qkv_proj.{kind}")
    # resampler (replicated)
    for name, p in model.resampler.named_parameters():
        put(p, full(f"model.perceiver_resampler.{name}"), name)
    # cross-attention blocks, TP-sliced like the LM
    tp, r = lm.tp_size, lm.tp_rank
    interval = cfg.xattn.cross_layer_interval
    for i, block in model.xattn_blocks():
        for name, param in block.named_parameters():
            theirs = xattn_name(i // interval, name)
            value = full(theirs)
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                value = value.chunk(tp, dim=param.partition_dim)[r]
            put(param, value, theirs)
    unused = names - used
    if unused:
        raise CheckpointError(f"{cfg.init_from}: tensors not used (does the config match the weights?): "
                              f"{sorted(unused)[:8]}")
