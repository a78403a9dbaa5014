"""Model code. Shape suffixes on tensors: B batch, T text tokens, N media (images) per sequence,
S vision tokens per image (CLS + patches), L resampler latents, D LM width, V vision width,
H heads, K key/value heads, E head dim, C channels, P pixels (H x W)."""
