"""The Flamingo model: frozen vision encoder -> Perceiver Resampler -> frozen LM with gated
cross-attention blocks placed before chosen LM layers (IDEFICS: before layer i when
i % cross_layer_interval == 0). Plain torch composition; the TP-aware pieces live in lm.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flamingo_dist.models.lm import TPLlama, target_loss, vocab_parallel_loss
from flamingo_dist.models.resampler import PerceiverResampler
from flamingo_dist.models.vision import VisionEncoder
from flamingo_dist.models.xattn import GatedCrossAttentionBlock, expand_image_mask


class FlamingoLayer(nn.Module):
    """An optional cross-attention block followed by one frozen LM layer: the unit of
    activation checkpointing."""

    def __init__(self, xattn: GatedCrossAttentionBlock | None, decoder: nn.Module):
        super().__init__()
        self.xattn = xattn
        # Not registered as a submodule: the decoder layer belongs to (and is saved as part of)
        # the LM; registering it here too would give every frozen weight a second name.
        object.__setattr__(self, "decoder", decoder)
        self.activation_checkpointing = False
        self.compiled_forward = None  # set by compile_unit (train.compile)

    def compile_unit(self, fullgraph: bool = False) -> None:
        """torch.compile this unit's forward (cross-attention block + LM layer) for the calls
        without a generation cache: training and validation. Generation stays eager (its shapes
        change every token). torch caches compiled graphs per code object, with the modules'
        weights as graph inputs, so layers of the same shape share one graph. At TP size 1 a unit
        is one graph (`fullgraph=True` holds: tests/test_hot_path.py); megatron's TP>1 linears
        break it in several."""
        self.compiled_forward = torch.compile(self._forward, dynamic=False, fullgraph=fullgraph)

    def _forward(self, x_BTD, cos, sin, media_BMV, mask_bias, has_image_BT, self_mask=None, media_kv=None,
                 kv_cache=None):
        if self.xattn is not None and media_BMV is not None:
            x_BTD = self.xattn(x_BTD, media_BMV, mask_bias, has_image_BT, media_kv)
        return self.decoder(x_BTD, cos, sin, attn_mask=self_mask, kv_cache=kv_cache)

    def forward(self, x_BTD, cos, sin, media_BMV, mask_bias, has_image_BT, self_mask=None, media_kv=None,
                kv_cache=None):
        if kv_cache is None and media_kv is None:
            unit = self.compiled_forward or self._forward
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: the reentrant form drops gradients of trainable parameters when the
                # block's inputs come from frozen layers (no input requires grad).
                return checkpoint(unit, x_BTD, cos, sin, media_BMV, mask_bias, has_image_BT, self_mask,
                                  use_reentrant=False)
            return unit(x_BTD, cos, sin, media_BMV, mask_bias, has_image_BT, self_mask)
        return self._forward(x_BTD, cos, sin, media_BMV, mask_bias, has_image_BT, self_mask, media_kv, kv_cache)


class GenerationCache:
    """What incremental decoding reuses across calls: the resampled media (vision encoder and
    resampler run once per prompt), each cross-attention block's keys/values of it (computed
    once), each LM layer's keys/values of the tokens so far, and how many tokens that is."""

    def __init__(self) -> None:
        self.media_BMV: torch.Tensor | None = None
        self.media_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: dict[int, dict] = {}
        self.length = 0

    def select(self, rows: torch.Tensor) -> "GenerationCache":
        """The cache of the given batch rows, in that order (beam search reorders its beams)."""
        other = GenerationCache()
        other.length = self.length
        if self.media_BMV is not None:
            other.media_BMV = self.media_BMV.index_select(0, rows)
        other.media_kv = {i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in self.media_kv.items()}
        other.layers = {i: {n: t.index_select(0, rows) for n, t in kv.items()} for i, kv in self.layers.items()}
        return other

    def fork(self) -> "GenerationCache":
        """An independent continuation of this cache (tensors are shared, never modified in
        place): score several continuations of one cached prefix."""
        other = GenerationCache()
        other.media_BMV, other.media_kv, other.length = self.media_BMV, dict(self.media_kv), self.length
        other.layers = {i: dict(kv) for i, kv in self.layers.items()}
        return other


class Flamingo(nn.Module):
    def __init__(self, vision: VisionEncoder, resampler: PerceiverResampler, lm: TPLlama,
                 xattn_blocks: dict[int, GatedCrossAttentionBlock], num_latents: int):
        super().__init__()
        self.vision = vision
        self.resampler = resampler
        self.lm = lm
        self.num_latents = num_latents
        self.layers = nn.ModuleList(
            FlamingoLayer(xattn_blocks.get(i), decoder) for i, decoder in enumerate(lm.layers))
        self.xattn_layer_indices = sorted(xattn_blocks)
        self.skip_padding_media = True  # encode only the media slots a token attends to (encode_media)
        self.packed_attention = "mask"  # how packed documents are kept apart: mask (SDPA) or flex

    def trainable_modules(self) -> list[nn.Module]:
        """Everything that trains; all other parameters are frozen."""
        return [self.resampler, *[layer.xattn for layer in self.layers if layer.xattn is not None],
                *self.lm.trainable_modules()]

    def parameters_used_outside_their_module(self) -> list[nn.Parameter]:
        """Trainable parameters read other than by calling their own module: the decoupled head's
        rows (and the embedding's, when tied) in `logits_parallel`, the resampler's time
        embeddings in `add_time`. (ZeRO-3 gathers a partitioned parameter only around its
        module's calls unless told otherwise: training/engine.py.)"""
        out = [self.lm.new_embed.weight] + ([self.lm.new_head.weight] if self.lm.new_head is not None else [])
        return out + ([self.resampler.frame_embs] if hasattr(self.resampler, "frame_embs") else [])

    def xattn_blocks(self) -> list[tuple[int, GatedCrossAttentionBlock]]:
        return [(i, layer.xattn) for i, layer in enumerate(self.layers) if layer.xattn is not None]

    def encode_media(self, pixel_values_BNCP: torch.Tensor, used_BN: torch.Tensor | None = None,
                     slots_M: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, 3, H, W] images, or [B, N, F, 3, H, W] videos of F frames each -> resampled
        media [B, N*L, V] (one media slot, L latents, per image or video).

        Only the slots some token attends to go through the vision encoder and the resampler (a
        packed batch has padding slots, often most of them); the others get zero latents, which
        no token sees. `slots_M`: their flat indices (row * N + slot) as the loader computed them
        (data/processing.py `collate`: nothing read back from the device here); else `used_BN`
        (bool), the slots attended to, from which they are found here (evaluation, generation).
        At least one slot is always encoded, so every rank calls the same modules also for a
        text-only micro-batch (ZeRO-3 gathers the weights inside them, and every rank's backward
        must reach the same parameters)."""
        B, N = pixel_values_BNCP.shape[:2]
        video = pixel_values_BNCP.dim() == 6
        if not self.skip_padding_media or (slots_M is None and used_BN is None):
            slots_M = torch.arange(B * N, device=pixel_values_BNCP.device)
        elif slots_M is None:
            used_X = used_BN.reshape(-1).clone()
            used_X[0] |= not bool(used_X.any())
            slots_M = used_X.nonzero().squeeze(1)  # M = encoded slots
        pixels_M = pixel_values_BNCP.flatten(0, 1).index_select(0, slots_M)
        feats_XSV = self.vision(pixels_M.flatten(0, 1) if video else pixels_M)  # X = M(*F), no autograd
        dtype = next(self.resampler.parameters()).dtype
        feats_XSV = feats_XSV.to(dtype)
        if video:  # frames of one video: time embeddings, then resampled together
            F = pixel_values_BNCP.shape[2]
            feats_XSV = self.resampler.add_time(feats_XSV.view(len(slots_M), F, *feats_XSV.shape[1:]))
        latents_MLV = self.resampler(feats_XSV)
        if len(slots_M) < B * N:
            latents_MLV = latents_MLV.new_zeros(B * N, *latents_MLV.shape[1:]).index_copy(0, slots_M, latents_MLV)
        return latents_MLV.view(B, N * self.num_latents, -1)

    def hidden_states(self, input_ids_BT, pixel_values_BNCP=None, image_attention_mask_BTN=None,
                      position_ids_BT=None, cache: GenerationCache | None = None,
                      document_ids_BT=None, media_slots_M=None) -> torch.Tensor:
        """With a `cache` (generation): the first call is the prompt (with its pixels), each later
        call one new token per row (pixels not needed, its image-mask row given); positions
        continue from the cached length. `document_ids_BT` (packed training sequences): a token
        attends only to earlier tokens with the same id (per-document self-attention).
        `media_slots_M`: the media slots to encode, from the loader (`encode_media`)."""
        x_BTD = self.lm.embed(input_ids_BT)
        T = input_ids_BT.shape[1]
        start = cache.length if cache is not None else 0
        if position_ids_BT is None:
            position_ids_BT = torch.arange(start, start + T, device=input_ids_BT.device).expand_as(input_ids_BT)
        cos, sin = self.lm.rope(position_ids_BT, x_BTD.dtype)
        media_BMV = mask_bias = has_image_BT = None
        if cache is not None and cache.media_BMV is not None:
            media_BMV = cache.media_BMV
        elif pixel_values_BNCP is not None:
            used_BN = (image_attention_mask_BTN.bool().any(dim=1)
                       if image_attention_mask_BTN is not None and media_slots_M is None else None)
            media_BMV = self.encode_media(pixel_values_BNCP, used_BN, media_slots_M).to(x_BTD.dtype)
            if cache is not None:
                cache.media_BMV = media_BMV
        if media_BMV is not None:
            mask_bias, has_image_BT = expand_image_mask(image_attention_mask_BTN, self.num_latents, x_BTD.dtype)
        self_mask = None
        if document_ids_BT is not None:
            if cache is not None:
                raise ValueError("document_ids (packed training sequences) do not go with a generation cache")
            # built once per micro-batch and shared by every layer (and its recomputation)
            self_mask = (document_block_mask(document_ids_BT) if self.packed_attention == "flex"
                         else document_causal_bias(document_ids_BT, x_BTD.dtype))
        for i, layer in enumerate(self.layers):
            media_kv = kv_cache = None
            if cache is not None:
                kv_cache = cache.layers.setdefault(i, {})
                if layer.xattn is not None and media_BMV is not None:
                    if i not in cache.media_kv:
                        cache.media_kv[i] = layer.xattn.media_kv(media_BMV)
                    media_kv = cache.media_kv[i]
            x_BTD = layer(x_BTD, cos, sin, media_BMV, mask_bias, has_image_BT, self_mask, media_kv, kv_cache)
        if cache is not None:
            cache.length += T
        return x_BTD

    def forward(self, input_ids_BT, pixel_values_BNCP=None, image_attention_mask_BTN=None,
                position_ids_BT=None, labels_BT=None, z_loss: float = 0.0, cache: GenerationCache | None = None,
                document_ids_BT=None, loss_chunk_tokens: int = 0, media_slots_M=None):
        """Without labels: this rank's vocabulary shard of the logits [B, T, Vp/tp]. With labels:
        (mean next-token loss over the labelled tokens + z-loss, detached statistics).
        `loss_chunk_tokens` > 0: the head and the loss run on chunks of that many positions, each
        recomputed in backward, so the logits of the whole batch are never held at once."""
        h = self.hidden_states(input_ids_BT, pixel_values_BNCP, image_attention_mask_BTN, position_ids_BT, cache,
                               document_ids_BT, media_slots_M)
        if labels_BT is not None and 0 < loss_chunk_tokens < h.shape[1]:
            ce_sum, z_sum, count = self._chunked_loss(h, labels_BT, z_loss, loss_chunk_tokens)
        else:
            logits = self.lm.logits_parallel(h)
            if labels_BT is None:
                return logits
            ce_sum, z_sum, count = vocab_parallel_loss(logits, labels_BT, z_loss, self.lm.tp_group)
        denom = count.clamp(min=1)
        return (ce_sum + z_sum) / denom, {"ce": (ce_sum / denom).detach(), "z_loss": (z_sum / denom).detach(),
                                          "tokens": count}

    def _chunked_loss(self, h_BTD, labels_BT, z_loss: float, chunk: int):
        """(CE sum, z-loss sum, predicted tokens) of `vocab_parallel_loss`, the head and loss run
        per chunk of positions under activation checkpointing (every TP rank walks the same
        chunks, so the head's collectives match)."""
        targets_BT = torch.cat([labels_BT[:, 1:], labels_BT.new_full((labels_BT.shape[0], 1), -100)], dim=1)

        def part(h, t):
            ce, z, _ = target_loss(self.lm.logits_parallel(h), t, z_loss, self.lm.tp_group)
            return ce, z

        ce_sum = z_sum = 0.0
        for s in range(0, h_BTD.shape[1], chunk):
            ce, z = checkpoint(part, h_BTD[:, s: s + chunk], targets_BT[:, s: s + chunk], use_reentrant=False)
            ce_sum, z_sum = ce_sum + ce, z_sum + z
        return ce_sum, z_sum, (targets_BT != -100).sum()

    def logits(self, *args, **kwargs) -> torch.Tensor:
        """Full logits [B, T, V+2], gathered across TP ranks (evaluation, parity tests)."""
        return self.lm.gather_logits(self.forward(*args, **kwargs))


def document_block_mask(document_ids_BT: torch.Tensor):
    """The same mask as `document_causal_mask` as a FlexAttention BlockMask: its kernel skips the
    blocks of the score matrix no token attends to (later tokens, other documents) instead of
    computing and masking them, and holds [B, T/128, T/128] block indices, not [B, T, T]."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = document_ids_BT.shape

    def causal_same_document(b, h, q, k):
        return (k <= q) & (document_ids_BT[b, q] == document_ids_BT[b, k])

    return create_block_mask(causal_same_document, B, None, T, T, device=document_ids_BT.device)


def document_causal_bias(document_ids_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`document_causal_mask` as SDPA's additive float mask [B, 1, T, T] (0 allowed, -inf not):
    SDPA turns a boolean mask into this in every call; made once, every layer reuses it."""
    allowed = document_causal_mask(document_ids_BT)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def document_causal_mask(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] boolean self-attention mask: causal, and only within
    a document (padding, id 0, attends to padding, so no row is empty)."""
    T = document_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids_BT.device).tril()
    same = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    return (same & causal)[:, None]
