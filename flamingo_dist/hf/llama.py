"""Hugging Face LLaMA-style checkpoints -> our tensor-parallel LM, sliced per rank at load time.

Each rank reads only its slice of every tensor (safetensors' lazy `get_slice`), so a 70B model
at TP=8 never materialises a full weight in one process. Random test models go through the
same path: `RandomLM` draws full tensors in Hugging Face names from a seed, so the model is the
same function at every TP size.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Protocol

import torch

from flamingo_dist.config.schema import LMConfig
from flamingo_dist.hf.llama_config import CheckpointError, read_hf_llama_config  # noqa: F401 (re-exported)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

def resolve_lm_config(cfg: LMConfig) -> list[str]:
    """Fill the shape fields from cfg.path's config.json; returns notes on replaced values."""
    if cfg.path is None:
        return []
    notes = []
    for key, value in read_hf_llama_config(cfg.path).items():
        if key == "num_kv_heads" and value == cfg.num_heads and cfg.num_kv_heads is None:
            value = None
        if getattr(cfg, key) != value:
            notes.append(f"model.lm.{key}: {getattr(cfg, key)!r} -> {value!r} (from {cfg.path}/config.json)")
            setattr(cfg, key, value)
    return notes


class TensorSource(Protocol):
    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


class DictTensors:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name].narrow(dim, start, stop - start)


class SafetensorsDir:
    """model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"model.lm.path: {path} holds neither model.safetensors nor "
                                  "model.safetensors.index.json")
        self.path, self.weight_map = path, weight_map
        self._open: dict[str, object] = {}
        for shard in set(weight_map.values()):
            full = os.path.join(path, shard)
            if not os.path.isfile(full):
                raise CheckpointError(f"{full}: shard listed in the index is missing")
            self._open[shard] = safe_open(full, "pt")

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open[self.weight_map[name]].get_slice(name).get_shape())

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        sl = self._open[self.weight_map[name]].get_slice(name)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]


def random_lm_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a LLaMA checkpoint in Hugging Face names, with their shapes."""
    D, E = cfg.hidden_size, cfg.head_dim
    t = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (cfg.num_heads * E, D)
        t[p + "self_attn.k_proj.weight"] = (cfg.kv_heads * E, D)
        t[p + "self_attn.v_proj.weight"] = (cfg.kv_heads * E, D)
        t[p + "self_attn.o_proj.weight"] = (D, cfg.num_heads * E)
        t[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, D)
        t[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, D)
        t[p + "mlp.down_proj.weight"] = (D, cfg.intermediate_size)
        t[p + "input_layernorm.weight"] = (D,)
        t[p + "post_attention_layernorm.weight"] = (D,)
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, D)
    return t


class RandomLM:
    """A random LLaMA as a `TensorSource` (normal(0, 0.02) matrices, unit norms), each tensor
    drawn when read from a generator seeded by (seed, its name): nothing is held beyond the
    tensor being loaded, and every rank and TP size draws the same values. On a CUDA device the
    draws run there (a 7B LM drawn on the host took most of two minutes, issue 18); the values
    then differ from the CPU's, but are the same on every GPU."""

    def __init__(self, cfg: LMConfig, seed: int, device: str | torch.device | None = None):
        self.shapes, self.seed = random_lm_shapes(cfg), seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def full(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:  # the norms
            return torch.ones(shape)
        g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g, device=self.device) * 0.02).cpu()

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.full(name).narrow(dim, start, stop - start)


def load_lm_weights(lm, source: TensorSource) -> None:
    """Copy this rank's slice of every checkpoint tensor into `lm` (a TPLlama). Every parameter
    of the frozen LM must be written and every checkpoint tensor used, or it fails naming them."""
    cfg: LMConfig = lm.cfg
    tp, r = lm.tp_size, lm.tp_rank
    D, E, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    H, K = cfg.num_heads, cfg.kv_heads
    names = {n for n in source.names() if not n.endswith(_IGNORED_SUFFIXES)}
    used: set[str] = set()

    def check(name: str, shape: tuple[int, ...]) -> None:
        if name not in names:
            raise CheckpointError(f"{getattr(source, 'path', 'checkpoint')}: tensor {name} is missing")
        got = source.shape(name)
        if got != shape:
            raise CheckpointError(f"{getattr(source, 'path', 'checkpoint')}: tensor {name} has shape "
                                  f"{list(got)}, expected {list(shape)} from the LM config")
        used.add(name)

    def read(name: str, shape: tuple[int, ...], dim: int = 0, parts: int = 1) -> torch.Tensor:
        """Rank r's 1/parts chunk of `name` along `dim`, after checking its full shape."""
        check(name, shape)
        n = shape[dim] // parts
        return source.read(name, dim, r * n, (r + 1) * n) if parts > 1 else source.read(name, dim, 0, shape[dim])

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise CheckpointError(f"internal: slice shape {list(value.shape)} != parameter {list(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    def vocab_rows(name: str) -> torch.Tensor:
        """Rows of the padded vocabulary owned by this rank; rows >= V are zero."""
        check(name, (cfg.vocab_size, D))  # only this rank's rows are read below
        start, n = r * lm.local_vocab, lm.local_vocab
        out = torch.zeros(n, D)
        stop = min(start + n, cfg.vocab_size)
        if stop > start:
            out[: stop - start] = source.read(name, 0, start, stop)
        return out

    put(lm.embed_tokens.weight, vocab_rows("model.embed_tokens.weight"))
    if not cfg.tie_embeddings:
        put(lm.lm_head.weight, vocab_rows("lm_head.weight"))
    put(lm.norm.weight, read("model.norm.weight", (D,)))
    for i, layer in enumerate(lm.layers):
        p = f"model.layers.{i}."
        put(layer.qkv_proj.weight, torch.cat([
            read(p + "self_attn.q_proj.weight", (H * E, D), 0, tp),
            read(p + "self_attn.k_proj.weight", (K * E, D), 0, tp),
            read(p + "self_attn.v_proj.weight", (K * E, D), 0, tp)]))
        put(layer.o_proj.weight, read(p + "self_attn.o_proj.weight", (D, H * E), 1, tp))
        put(layer.gate_up_proj.weight, torch.cat([
            read(p + "mlp.gate_proj.weight", (I, D), 0, tp), read(p + "mlp.up_proj.weight", (I, D), 0, tp)]))
        put(layer.down_proj.weight, read(p + "mlp.down_proj.weight", (D, I), 1, tp))
        put(layer.input_layernorm.weight, read(p + "input_layernorm.weight", (D,)))
        put(layer.post_attention_layernorm.weight, read(p + "post_attention_layernorm.weight", (D,)))
    unused = names - used
    if cfg.tie_embeddings:
        unused.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if unused:
        raise CheckpointError(f"{getattr(source, 'path', 'checkpoint')}: tensors not used by the LM config "
                              f"(wrong architecture or layer count?): {sorted(unused)[:8]}")


def load_tokenizer(path: str, vocab_size: int):
    """The checkpoint's tokenizer with `<fake_token_around_image>` (id V) and `<image>` (V+1)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise CheckpointError(f"tokenizer: {path} is not a directory")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    new = ["<fake_token_around_image>", "<image>"]
    has_new = tok.convert_tokens_to_ids(new) == [vocab_size, vocab_size + 1] and len(tok) == vocab_size + 2
    if len(tok) != vocab_size and not has_new:  # an IDEFICS tokenizer already holds them
        raise CheckpointError(f"tokenizer {path}: {len(tok)} tokens, but the LM's vocab_size is {vocab_size}")
    if not has_new:
        tok.add_special_tokens({"additional_special_tokens": new})
    ids = tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>"])
    if ids != [vocab_size, vocab_size + 1]:
        raise CheckpointError(f"tokenizer {path}: new tokens got ids {ids}, expected {[vocab_size, vocab_size + 1]}")
    if tok.eos_token_id is None or tok.bos_token_id is None:
        raise CheckpointError(f"tokenizer {path}: needs bos and eos tokens")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok
