"""Our trainable blocks against transformers' IDEFICS modules (the external reference): the
same state-dict names (so export is a rename) and the same outputs."""

import pytest
import torch

from flamingo_dist.models.resampler import PerceiverResampler
from flamingo_dist.models.xattn import GatedCrossAttentionBlock, expand_image_mask


def idefics_config(qk: bool, alpha_type: str = "float"):
    from transformers import IdeficsConfig

    return IdeficsConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, rms_norm_eps=1e-6,
                         qk_layer_norms=qk, alpha_type=alpha_type, alpha_initializer="zeros",
                         dropout=0.0, vision_config={"embed_dim": 48, "num_attention_heads": 4, "intermediate_size": 96},
                         perceiver_config={"use_resampler": True, "resampler_n_latents": 8, "resampler_depth": 2,
                                           "resampler_n_heads": 4, "resampler_head_dim": 16,
                                           "qk_layer_norms_perceiver": qk})


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm scales around 1, gates open), so no term is trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_scale = p.ndim == 1 and ("norm" in name or ".ln." in name) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_scale else 0.0))


@pytest.mark.parametrize("qk", [False, True])
def test_resampler_matches_idefics_perceiver(qk):
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    ref = IdeficsPerceiverResampler(idefics_config(qk), embed_dim=48, depth=2, n_heads=4, head_dim=16, n_latents=8).eval()
    randomize_(ref, 0)
    ours = PerceiverResampler(48, depth=2, num_heads=4, head_dim=16, num_latents=8, qk_layer_norms=qk)
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical names and shapes
    x = torch.randn(3, 17, 48)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk,alpha_type", [(False, "float"), (True, "vector")])
def test_xattn_block_matches_idefics_gated_cross_attention(qk, alpha_type):
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    cfg = idefics_config(qk, alpha_type)
    ref = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    randomize_(ref, 1)
    ours = GatedCrossAttentionBlock(64, 48, 4, 128, 1e-6, alpha_type, qk)
    mapped = {k.replace("cross_attn.", "").replace("mlp.", ""): v for k, v in ref.state_dict().items()
              if not k.endswith("rotary_emb.inv_freq")}
    ours.load_state_dict(mapped, strict=True)
    B, T, N, L = 2, 10, 2, 8
    x, media = torch.randn(B, T, 64), torch.randn(B, N * L, 48)
    mask = torch.zeros(B, T, N, dtype=torch.long)
    mask[:, 2:6, 0] = 1
    mask[:, 6:, 1] = 1
    mask[1, 8:, :] = 0  # tokens with no image
    bias, has_image = expand_image_mask(mask, L, torch.float32)
    # transformers' IdeficsModel: expand per latent, invert to an additive mask, gate from it
    ref_mask = mask.unsqueeze(-1).repeat(1, 1, 1, L).view(B, T, N * L).float()
    ref_bias = ((1.0 - ref_mask) * torch.finfo(torch.float32).min)[:, None]
    gate = (ref_bias == 0.0).any(dim=-1).float().squeeze(1)
    with torch.no_grad():
        a = ours(x, media, bias, has_image)
        b = ref(x, image_hidden_states=media, image_attention_mask=ref_bias, cross_attention_gate=gate)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
