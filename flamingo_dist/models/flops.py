"""Model FLOPs of one training step, counted for a *frozen* LM (for MFU).

A matmul with N weights applied to one token costs 2N forward. In training:
  - a trainable matmul costs 6N (forward, input gradient, weight gradient);
  - a frozen matmul that the gradient passes through costs 4N (forward, input gradient): every
    LM layer and the LM head, since the trainable decoupled embeddings sit below the first layer;
  - a no-grad matmul costs 2N (the vision encoder runs without autograd).
Attention score/value products have no weights: 4·T_q·T_k·width forward (counted in full, also
when causal, the usual MFU convention), x3 when the gradient passes through them, x1 without.
Only matmuls, convolutions and attention are counted; norms and element-wise work are not, the
same as `torch.utils.flop_counter.FlopCounterMode`, which a test checks this count against.
"""

from __future__ import annotations

from flamingo_dist.config.schema import ModelConfig, xattn_layer_indices
from flamingo_dist.models.lm import NUM_NEW_TOKENS, padded_vocab_size


def train_flops(cfg: ModelConfig, vision: dict, batch_size: int, seq_len: int, num_images: int,
                tp_size: int = 1, encoded_images: float | None = None) -> float:
    """FLOPs of forward + backward for `batch_size` sequences of `seq_len` tokens, each with
    `num_images` image slots that every text token's cross-attention spans. `encoded_images`: the
    images of the whole batch that go through the vision encoder and resampler (padding slots no
    token attends to are skipped, `Flamingo.encode_media`); default all `batch_size * num_images`
    slots. `vision` is `VisionEncoder.shape()`."""
    lm, r = cfg.lm, cfg.resampler
    v = vision
    D, E, I, T = lm.hidden_size, lm.head_dim, lm.intermediate_size, seq_len
    H, K = lm.num_heads, lm.kv_heads
    Dv, P = v["width"], v["patch_size"]
    S = (v["image_size"] // P) ** 2 + 1  # CLS + patches
    L, Dr = r.num_latents, r.num_heads * r.head_dim
    M = num_images * L  # media tokens each text token may attend to
    Vp = padded_vocab_size(lm.vocab_size, tp_size)

    # frozen LM: 4N per token, attention x3
    layer_n = D * (H + 2 * K) * E + H * E * D + 3 * D * I
    frozen = 4 * T * (lm.num_layers * layer_n + D * Vp) + 3 * lm.num_layers * 4 * T * T * H * E
    trainable_head = 6 * T * D * NUM_NEW_TOKENS
    # cross-attention blocks: q/o/MLP on text tokens, k/v on media tokens (all trainable)
    n_x = len(xattn_layer_indices(cfg))
    xattn = n_x * (6 * T * (2 * D * H * E + 3 * D * I) + 6 * M * 2 * Dv * H * E + 3 * 4 * T * M * H * E)
    # resampler per image: q/o/MLP on latents, k/v on context+latents; attention x3
    res = r.depth * (6 * L * (2 * Dv * Dr + 2 * Dv * 4 * Dv) + 6 * (S + L) * 2 * Dv * Dr
                     + 3 * 4 * L * (S + L) * Dr)
    # vision encoder per image, no autograd: patch conv, blocks (qkv, o, MLP), attention
    mlp = v["mlp"]
    vit = 2 * (S - 1) * 3 * P * P * Dv + v["layers"] * (2 * S * (4 * Dv * Dv + 2 * Dv * mlp) + 4 * S * S * Dv)
    if encoded_images is None:
        encoded_images = batch_size * num_images
    return float(batch_size * (frozen + trainable_head + xattn) + encoded_images * (res + vit))
