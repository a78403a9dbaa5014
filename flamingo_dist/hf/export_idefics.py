"""Export to Hugging Face IDEFICS (`IdeficsForVisionText2Text` + `IdeficsProcessor`).

Our default model is built to be semantically identical to transformers' IDEFICS, so export is
a weight remap: fused q/k/v and gate|up split apart, the padded vocabulary cut back to V, the
decoupled rows moved to `additional_embedding` / `additional_fc`, cross-attention block before
layer i -> `gated_cross_attn_layers[i // interval]`, the open_clip ViT renamed to HF CLIP names.
Models IDEFICS cannot represent are refused with the reason.

This works on an in-memory model at TP=1; checkpoints trained at `tensor_parallel_size` > 1 are
merged to TP=1 when loaded for export (`tools/export_idefics.py`, through the universal
checkpoint in training/checkpoint.py).
"""

from __future__ import annotations

import os

import torch

from flamingo_dist.config.schema import ModelConfig, xattn_layer_indices


class ExportError(ValueError):
    """The model cannot be expressed as IDEFICS; the message says why."""


def check_exportable(cfg: ModelConfig, visual) -> None:
    """Raise ExportError listing everything IDEFICS cannot represent."""
    lm, x = cfg.lm, cfg.xattn
    reasons = []
    if lm.kv_heads != lm.num_heads:
        reasons.append(f"grouped-query attention ({lm.kv_heads} key/value heads for {lm.num_heads} query heads): "
                       "IDEFICS' LLaMA ignores num_key_value_heads")
    if lm.num_layers % x.cross_layer_interval:
        reasons.append(f"{lm.num_layers} layers is not a multiple of cross_layer_interval {x.cross_layer_interval}: "
                       "IDEFICS builds num_layers // interval cross-attention blocks")
    expected = [i for i in range(lm.num_layers) if i % x.cross_layer_interval == 0]
    if xattn_layer_indices(cfg) != expected:
        reasons.append(f"cross-attention placement {x.placement!r} (layers {xattn_layer_indices(cfg)}): IDEFICS "
                       f"places a block before layer i when i % interval == 0 ({expected})")
    if cfg.resampler.max_frames:
        reasons.append(f"video time embeddings (model.resampler.max_frames = {cfg.resampler.max_frames}): IDEFICS' "
                       "resampler has none (its inputs are single images)")
    block = visual.transformer.resblocks[0]
    if getattr(visual, "attn_pool", None) is not None:
        reasons.append("the vision tower has attentional pooling: not a plain ViT")
    if not isinstance(getattr(block, "ls_1", torch.nn.Identity()), torch.nn.Identity):
        reasons.append("the vision tower uses layer scale: not a plain ViT")
    if not isinstance(block.attn, torch.nn.MultiheadAttention):
        reasons.append(f"the vision tower's attention is {type(block.attn).__name__}, not a plain ViT's")
    if reasons:
        raise ExportError("cannot export to IDEFICS:\n  " + "\n  ".join(reasons))


def idefics_config(cfg: ModelConfig, vision, tokenizer=None):
    from transformers import IdeficsConfig

    lm, x, r = cfg.lm, cfg.xattn, cfg.resampler
    v = vision.shape()
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return IdeficsConfig(
        vocab_size=lm.vocab_size, additional_vocab_size=2, hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads, rms_norm_eps=lm.rms_norm_eps, hidden_act="silu",
        tie_word_embeddings=lm.tie_embeddings, max_position_embeddings=lm.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
        cross_layer_interval=x.cross_layer_interval, qk_layer_norms=x.qk_layer_norms,
        alpha_type=x.alpha_type, alpha_initializer="zeros", use_resampler=True, dropout=0.0,
        vision_config=dict(embed_dim=v["width"], image_size=v["image_size"], patch_size=v["patch_size"],
                           num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                           intermediate_size=v["mlp"], hidden_act=cfg.vision.activation, layer_norm_eps=1e-5),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=r.num_latents, resampler_depth=r.depth,
                              resampler_n_heads=r.num_heads, resampler_head_dim=r.head_dim,
                              qk_layer_norms_perceiver=r.qk_layer_norms),
        **ids)


def vision_names(num_layers: int) -> dict[str, str]:
    """open_clip visual name -> IDEFICS name, for everything but the packed q/k/v in_proj
    (shared by export and import)."""
    p = "model.vision_model."
    out = {"conv1.weight": p + "embeddings.patch_embedding.weight", "class_embedding": p + "embeddings.class_embedding",
           "positional_embedding": p + "embeddings.position_embedding.weight",
           "ln_pre.weight": p + "pre_layrnorm.weight", "ln_pre.bias": p + "pre_layrnorm.bias",
           "ln_post.weight": p + "post_layernorm.weight", "ln_post.bias": p + "post_layernorm.bias"}
    for i in range(num_layers):
        s, d = f"transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out.update({s + f"attn.out_proj.{kind}": d + f"self_attn.out_proj.{kind}",
                        s + f"ln_1.{kind}": d + f"layer_norm1.{kind}", s + f"ln_2.{kind}": d + f"layer_norm2.{kind}",
                        s + f"mlp.c_fc.{kind}": d + f"mlp.fc1.{kind}", s + f"mlp.c_proj.{kind}": d + f"mlp.fc2.{kind}"})
    return out


_XATTN_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_layer_norm", "k_layer_norm"}
_XATTN_MLP = {"gate_proj", "up_proj", "down_proj"}


def xattn_name(block_index: int, name: str) -> str:
    """Our cross-attention block parameter name -> IDEFICS name (shared by export and import)."""
    base = name.split(".")[0]
    prefix = "cross_attn." if base in _XATTN_ATTN else "mlp." if base in _XATTN_MLP else ""
    return f"model.gated_cross_attn_layers.{block_index}.{prefix}{name}"


def _vision_state(visual) -> dict[str, torch.Tensor]:
    sd = {k: t.detach() for k, t in visual.state_dict().items()}
    n = len(visual.transformer.resblocks)
    out = {theirs: sd[ours] for ours, theirs in vision_names(n).items()}
    for i in range(n):
        d = f"model.vision_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            for x, t in zip("qkv", sd[f"transformer.resblocks.{i}.attn.in_proj_{kind}"].chunk(3, dim=0)):
                out[d + f"{x}_proj.{kind}"] = t
    return out


def idefics_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our TP=1 model's weights under transformers' IDEFICS names."""
    lm = model.lm
    if lm.tp_size != 1:
        raise ExportError(f"export works on a TP=1 model (this one has tensor_parallel_size {lm.tp_size})")
    c = cfg.lm
    V, H, E, I = c.vocab_size, c.num_heads, c.head_dim, c.intermediate_size
    out = _vision_state(model.vision.visual)
    out.update({f"model.perceiver_resampler.{k}": t.detach() for k, t in model.resampler.state_dict().items()})
    out["model.embed_tokens.weight"] = lm.embed_tokens.weight.detach()[:V]
    out["model.embed_tokens.additional_embedding.weight"] = lm.new_embed.weight.detach()
    head = lm.embed_tokens.weight if c.tie_embeddings else lm.lm_head.weight
    out["lm_head.weight"] = head.detach()[:V]
    new_head = lm.new_embed.weight if c.tie_embeddings else lm.new_head.weight
    out["lm_head.additional_fc.weight"] = new_head.detach()
    out["model.norm.weight"] = lm.norm.weight.detach()
    for i, layer in enumerate(lm.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.qkv_proj.weight.detach().split([H * E, H * E, H * E])
        gate, up = layer.gate_up_proj.weight.detach().split([I, I])
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": layer.o_proj.weight.detach(),
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": layer.down_proj.weight.detach(),
                    p + "input_layernorm.weight": layer.input_layernorm.weight.detach(),
                    p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight.detach()})
    for i, block in model.xattn_blocks():
        for name, t in block.state_dict().items():
            out[xattn_name(i // cfg.xattn.cross_layer_interval, name)] = t.detach()
    return out


def export_idefics(model, cfg: ModelConfig, out_dir: str, tokenizer=None, dtype: torch.dtype = torch.float32) -> str:
    """Write a directory that `IdeficsForVisionText2Text.from_pretrained` (and, with a
    tokenizer, `IdeficsProcessor.from_pretrained`) loads. Loading into the HF model is strict."""
    from transformers import IdeficsForVisionText2Text, IdeficsImageProcessor, IdeficsProcessor

    from flamingo_dist.data.processing import CLIP_MEAN, CLIP_STD

    visual = model.vision.visual
    check_exportable(cfg, visual)
    hf_cfg = idefics_config(cfg, model.vision, tokenizer)
    with torch.device("meta"):
        hf = IdeficsForVisionText2Text(hf_cfg)
    state = {k: v.to(dtype).clone() for k, v in idefics_state_dict(model, cfg).items()}
    expected = set(hf.state_dict())
    if cfg.lm.tie_embeddings:  # transformers ties these itself
        expected -= {"lm_head.weight", "lm_head.additional_fc.weight"}
        state = {k: v for k, v in state.items() if k in expected}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(f"internal: weight names do not match IDEFICS (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]})")
    hf.load_state_dict(state, strict=not cfg.lm.tie_embeddings, assign=True)
    if cfg.lm.tie_embeddings:
        hf.tie_weights()
    hf = hf.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        image_processor = IdeficsImageProcessor(image_size=hf_cfg.vision_config.image_size,
                                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        IdeficsProcessor(image_processor, tokenizer).save_pretrained(out_dir)
    return out_dir
