"""The frozen LLaMA-family LM on megatron-core's tensor-parallel layers.

This is the one model file that knows megatron's TP: `VocabParallelEmbedding`,
`ColumnParallelLinear`, `RowParallelLinear` and `vocab_parallel_cross_entropy`, with attention
through `scaled_dot_product_attention`. megatron's `GPTModel`/`TransformerLayer` are not used:
their RoPE and attention buffers call `torch.cuda.current_device()` and cannot run on CPU.

Layout per TP rank: heads, key/value heads and MLP columns are split evenly; q/k/v are fused in
one column-parallel matmul laid out [q_local | k_local | v_local], gate/up likewise
[gate_local | up_local] (one GEMM instead of three or two). The vocabulary is padded to a
multiple of TP; the rows for the two new tokens (ids V, V+1) come from small trainable
"decoupled" tables (IDEFICS' DecoupledEmbedding/DecoupledLinear) and padded rows get -inf logits
so they never enter the loss.

Weights are never initialised here (`perform_initialization=False`): both real checkpoints and
random test models go through `flamingo_dist.hf.llama`, which slices full tensors per rank, so a
model is the same function at every TP size.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from flamingo_dist.config.schema import LMConfig
from flamingo_dist.models.common import RMSNorm, apply_rope, rope_cos_sin

NUM_NEW_TOKENS = 2  # <fake_token_around_image> = V, <image> = V + 1


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Base vocabulary plus the two new tokens, rounded up to a multiple of the TP size."""
    total = vocab_size + NUM_NEW_TOKENS
    return -(-total // tp_size) * tp_size


def _mp_config(tp_size: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype)


def _noinit(_: torch.Tensor) -> None:
    return None


class TPLinears:
    """`LinearFactory` over megatron's column/row-parallel layers for one TP group; also used by
    the cross-attention blocks so they are sharded exactly like the LM's attention and MLP."""

    def __init__(self, tp_group: dist.ProcessGroup, dtype: torch.dtype = torch.float32):
        self.tp_group = tp_group
        self.tp_size = dist.get_world_size(tp_group)
        self.dtype = dtype

    def column(self, in_features: int, out_features: int, allocate_weight: bool = True) -> nn.Module:
        if self.tp_size == 1:
            return LocalLinear(in_features, out_features, self.dtype, partition_dim=0, allocate_weight=allocate_weight)
        return ColumnLinear(in_features, out_features, config=_mp_config(self.tp_size, self.dtype),
                            init_method=_noinit, bias=False, gather_output=False, tp_group=self.tp_group,
                            skip_weight_param_allocation=not allocate_weight)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        if self.tp_size == 1:
            return LocalLinear(in_features, out_features, self.dtype, partition_dim=1)
        return RowLinear(in_features, out_features, config=_mp_config(self.tp_size, self.dtype),
                         init_method=_noinit, bias=False, input_is_parallel=True, skip_bias_add=False,
                         tp_group=self.tp_group)

    def sum_grad_over_tp(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return t
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(t, group=self.tp_group)


class LocalLinear(nn.Module):
    """A column- or row-parallel linear at TP size 1: the same `weight` (name, shape, dtype and
    megatron's TP attributes, so checkpoints, resharding and DeepSpeed's norm see no difference)
    through plain `F.linear`. megatron's layers cost two autograd functions and their
    bookkeeping per call for collectives that are identities at TP=1, and break a compiled unit
    into a dozen graphs. `forward(x, weight)` takes another weight (the tied LM head)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, partition_dim: int,
                 allocate_weight: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if allocate_weight:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
            _mark_sharded(self.weight, partition_dim)
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.linear(x, self.weight if weight is None else weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@functools.cache  # megatron is imported lazily; the subclasses are made once
def _column_cls():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class _Column(ColumnParallelLinear):
        # megatron's always-None `_extra_state` (Transformer Engine's FP8 metadata) stays out of
        # our state dicts: checkpoints and exports hold tensors only
        get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._load_state_dict_pre_hooks.clear()  # megatron's one pre-hook inserts `_extra_state`

        def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x, weight=weight)[0]

    return _Column


@functools.cache
def _row_cls():
    from megatron.core.tensor_parallel import RowParallelLinear, reduce_from_tensor_model_parallel_region

    class _Row(RowParallelLinear):
        get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state  # as _Column

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._load_state_dict_pre_hooks.clear()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            # RowParallelLinear.forward for our case (input already split, no bias, no sequence
            # parallelism), passing our TP group: megatron 0.16.1's forward passes tp_group=None
            # to its matmul, which then calls warnings.warn on rank 0 in every call
            out = self._forward_impl(input=x, weight=self.weight, bias=None,
                                     gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                     allreduce_dgrad=False, sequence_parallel=False, tp_group=self.tp_group,
                                     grad_output_buffer=None)
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    return _Row


def _mark_sharded(weight: torch.Tensor | None, dim: int) -> None:
    """megatron sets `tensor_model_parallel`/`partition_dim` only when it initialises the weight
    itself; we skip that (weights are loaded or drawn full-size and sliced), so set them here.
    DeepSpeed's gradient norm and our initialisation read them."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if weight is not None:
        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def ColumnLinear(*args, **kwargs) -> nn.Module:  # noqa: N802 (a constructor)
    layer = _column_cls()(*args, **kwargs)
    _mark_sharded(layer.weight, 0)
    return layer


def RowLinear(*args, **kwargs) -> nn.Module:  # noqa: N802
    layer = _row_cls()(*args, **kwargs)
    _mark_sharded(layer.weight, 1)
    return layer


def is_block_mask(mask) -> bool:
    if mask is None or isinstance(mask, torch.Tensor):
        return False
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


@functools.cache
def flex_attention_kernel():
    """FlexAttention compiled into one fused kernel (Triton on GPU, C++ on CPU); uncompiled it
    materialises the scores. torch 2.14 has no FlexAttention backward on CPU: training with it
    needs a GPU (refused at start-up otherwise, training/inputs.py)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class DecoderLayer(nn.Module):
    """One frozen LLaMA layer: pre-RMSNorm attention with RoPE, pre-RMSNorm SwiGLU MLP."""

    def __init__(self, cfg: LMConfig, linears: TPLinears):
        super().__init__()
        tp = linears.tp_size
        self.head_dim = cfg.head_dim
        self.local_heads, self.local_kv_heads = cfg.num_heads // tp, cfg.kv_heads // tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = linears.column(cfg.hidden_size, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim)
        self.o_proj = linears.row(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = linears.column(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = linears.row(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_cache: dict | None = None) -> torch.Tensor:
        """kv_cache (generation, scoring): this layer's keys/values of the earlier tokens; a
        prompt fills it, then each call adds tokens that attend to all of them (and causally to
        each other)."""
        B, T, _ = x_BTD.shape
        H, K, E = self.local_heads, self.local_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x_BTD))
        # RoPE on queries and keys together: one set of kernels for both
        qk_BHTE = apply_rope(qkv[..., : (H + K) * E].view(B, T, H + K, E).transpose(1, 2), cos, sin)
        q_BHTE, k_BKTE = qk_BHTE[:, :H], qk_BHTE[:, H:]
        v_BKTE = qkv[..., (H + K) * E:].view(B, T, K, E).transpose(1, 2)
        causal = attn_mask is None
        if kv_cache is not None:
            if "k" in kv_cache:
                if attn_mask is not None:
                    raise ValueError("an attention mask with a KV cache is not supported")
                past = kv_cache["k"].shape[2]
                k_BKTE = torch.cat([kv_cache["k"], k_BKTE], dim=2)
                v_BKTE = torch.cat([kv_cache["v"], v_BKTE], dim=2)
                causal = False  # new token i sees every cached token and new tokens 0..i
                if T > 1:
                    attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past)
            kv_cache["k"], kv_cache["v"] = k_BKTE, v_BKTE
        if is_block_mask(attn_mask):  # packed documents through FlexAttention (models/flamingo.py)
            attn_BHTE = flex_attention_kernel()(q_BHTE, k_BKTE, v_BKTE, block_mask=attn_mask, enable_gqa=K != H)
        else:
            attn_BHTE = nn.functional.scaled_dot_product_attention(
                q_BHTE, k_BKTE, v_BKTE, attn_mask=attn_mask, is_causal=causal, enable_gqa=K != H)
        x_BTD = x_BTD + self.o_proj(attn_BHTE.transpose(1, 2).reshape(B, T, H * E))
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x_BTD))
        gate, up = gate_up.chunk(2, dim=-1)
        return x_BTD + self.down_proj(nn.functional.silu(gate) * up)


class TPLlama(nn.Module):
    """Embedding, decoder layers, final norm and (vocab-parallel) head. The decoupled tables for
    the new tokens are the only trainable parameters here."""

    def __init__(self, cfg: LMConfig, tp_group: dist.ProcessGroup, dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.cfg = cfg
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        self.linears = TPLinears(tp_group, dtype)
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, self.tp_size)
        self.local_vocab = self.padded_vocab_size // self.tp_size
        self.embed_tokens = VocabParallelEmbedding(
            self.padded_vocab_size, cfg.hidden_size, init_method=_noinit,
            config=_mp_config(self.tp_size, dtype), tp_group=tp_group)
        _mark_sharded(self.embed_tokens.weight, 0)
        self.new_embed = nn.Embedding(NUM_NEW_TOKENS, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.linears) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_embeddings:
            self.lm_head = self.linears.column(cfg.hidden_size, self.padded_vocab_size, allocate_weight=False)
            self.new_head = None  # IDEFICS ties the decoupled output rows to the decoupled embedding
        else:
            self.lm_head = self.linears.column(cfg.hidden_size, self.padded_vocab_size)
            self.new_head = nn.Linear(cfg.hidden_size, NUM_NEW_TOKENS, bias=False)

    def trainable_modules(self) -> list[nn.Module]:
        return [m for m in (self.new_embed, self.new_head) if m is not None]

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        is_new_BT = input_ids_BT >= self.vocab_size
        base_BTD = self.embed_tokens(input_ids_BT)
        new_BTD = self.new_embed((input_ids_BT - self.vocab_size).clamp(0, NUM_NEW_TOKENS - 1))
        return torch.where(is_new_BT[..., None], new_BTD.to(base_BTD.dtype), base_BTD)

    def rope(self, position_ids_BT: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(position_ids_BT, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def logits_parallel(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Final norm and head: this rank's vocabulary shard [B, T, Vp/tp], with the new tokens'
        rows from the decoupled head and -inf on padded rows."""
        h_BTD = self.norm(x_BTD)
        if self.cfg.tie_embeddings:
            logits = self.lm_head(h_BTD, weight=self.embed_tokens.weight)
            new_weight = self.new_embed.weight
        else:
            logits = self.lm_head(h_BTD)
            new_weight = self.new_head.weight
        new_BT2 = nn.functional.linear(h_BTD, new_weight.to(h_BTD.dtype))
        start, V, n = self.tp_rank * self.local_vocab, self.vocab_size, self.local_vocab
        lo, hi = min(max(V - start, 0), n), min(max(V + NUM_NEW_TOKENS - start, 0), n)
        return _PlaceNewLogits.apply(logits, new_BT2, lo, hi, start + lo - V, self.tp_group, self.tp_size)

    def forward(self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """The bare LM (no media): this rank's logits shard [B, T, Vp/tp]."""
        x_BTD = self.embed(input_ids_BT)
        if position_ids_BT is None:
            position_ids_BT = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device).expand_as(input_ids_BT)
        cos, sin = self.rope(position_ids_BT, x_BTD.dtype)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos, sin)
        return self.logits_parallel(x_BTD)

    def gather_logits(self, logits_BTv: torch.Tensor) -> torch.Tensor:
        """Full logits [B, T, V+2] (the IDEFICS output width) from the per-rank shards."""
        # megatron's gather_from_tensor_model_parallel_region allocates on torch.cuda.current_device();
        # torch.distributed.nn.functional.all_gather warns that it is deprecated in every call
        if self.tp_size > 1:
            from torch.distributed import _functional_collectives as funcol

            gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd  # < 2.14
            logits_BTv = funcol.wait_tensor(gather(logits_BTv.contiguous(), gather_dim=logits_BTv.dim() - 1,
                                                   group=self.tp_group))  # a negative gather_dim goes wrong
        return logits_BTv[..., : self.vocab_size + NUM_NEW_TOKENS]


class _PlaceNewLogits(torch.autograd.Function):
    """Write the decoupled head's logits into columns [lo, hi) of this rank's shard and -inf
    into the padded columns [hi, n), in place (the frozen head's output is not needed for its
    backward). Backward: the new logits' gradient exists only on the rank that holds ids V, V+1,
    so it is summed over TP on every rank; every rank then sees the full gradient for the
    replicated decoupled head and for the hidden state."""

    @staticmethod
    def forward(ctx, logits, new_BT2, lo: int, hi: int, k0: int, tp_group, tp_size: int):
        ctx.lo, ctx.hi, ctx.k0, ctx.tp_group, ctx.tp_size = lo, hi, k0, tp_group, tp_size
        ctx.new_width = new_BT2.shape[-1]
        if hi > lo:
            logits[..., lo:hi] = new_BT2[..., k0: k0 + hi - lo]
        if hi < logits.shape[-1]:
            logits[..., hi:] = float("-inf")
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        lo, hi, k0 = ctx.lo, ctx.hi, ctx.k0
        grad_new = torch.zeros(*grad.shape[:-1], ctx.new_width, dtype=grad.dtype, device=grad.device)
        if lo < grad.shape[-1]:
            grad_new[..., k0: k0 + hi - lo] = grad[..., lo:hi]
            grad = grad.clone()
            grad[..., lo:] = 0
        if ctx.tp_size > 1:  # called on every rank, so the collective always matches
            dist.all_reduce(grad_new, group=ctx.tp_group)
        return grad, grad_new, None, None, None, None, None


def vocab_parallel_loss(logits_BTv: torch.Tensor, labels_BT: torch.Tensor, z_loss: float,
                        tp_group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over vocab-parallel logits (labels aligned with input ids,
    -100 ignored). Returns (summed CE, summed z-loss term, number of predicted tokens)."""
    return target_loss(logits_BTv[:, :-1], labels_BT[:, 1:], z_loss, tp_group)


def target_loss(logits_BTv: torch.Tensor, targets_BT: torch.Tensor, z_loss: float,
                tp_group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`vocab_parallel_loss` with the targets already shifted: position t is scored against
    targets_BT[:, t] (-100 ignored)."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    logits, targets = logits_BTv.float(), targets_BT
    valid = targets != -100
    # megatron's kernel subtracts the max from its input in place: give it its own copy.
    ce = vocab_parallel_cross_entropy(logits.clone(), targets.masked_fill(~valid, 0))
    ce_sum = (ce * valid).sum()
    z_sum = torch.zeros((), dtype=ce_sum.dtype, device=ce_sum.device)
    if z_loss > 0:
        m = logits.max(dim=-1, keepdim=True).values.detach()
        if dist.get_world_size(tp_group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        s = reduce_from_tensor_model_parallel_region((logits - m).exp().sum(-1), group=tp_group)
        lse = s.log() + m.squeeze(-1)
        z_sum = z_loss * (lse.pow(2) * valid).sum()
    return ce_sum, z_sum, valid.sum()
