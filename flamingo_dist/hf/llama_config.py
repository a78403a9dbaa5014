"""A Hugging Face LLaMA checkpoint's config.json read onto our LMConfig fields, refusing what the
model cannot represent. No torch: the start-up checks (training/inputs.py) use it before anything
heavy is imported."""

from __future__ import annotations

import json
import os

SUPPORTED_ARCHS = ("LlamaForCausalLM",)


class CheckpointError(ValueError):
    """A checkpoint directory that does not fit: the message names the path, tensor or field."""


def read_hf_llama_config(path: str) -> dict:
    """Map a checkpoint's config.json onto LMConfig fields, refusing what we cannot represent."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"model.lm.path: {path} is not a directory")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"model.lm.path: {cfg_file} is missing")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or not any(a in SUPPORTED_ARCHS for a in archs):
        raise CheckpointError(f"{cfg_file}: architecture {archs or hf.get('model_type')!r} is not supported "
                              f"(need model_type 'llama' and one of {SUPPORTED_ARCHS})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"{cfg_file}: no integer {', '.join(missing)}")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention/MLP biases")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        problems.append(f"rope scaling {rope_type!r}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    if problems:
        raise CheckpointError(f"{cfg_file}: unsupported " + ", ".join(problems))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
                rope_theta=float(theta), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=hf.get("max_position_embeddings", 2048))
