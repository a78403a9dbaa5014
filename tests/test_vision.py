"""The frozen vision encoder: IDEFICS-style features (before the final LayerNorm, CLS first),
local weights files, the activation setting."""

import pytest
import torch

from flamingo_dist.models.vision import build_vision_encoder


def test_features_are_the_tokens_before_the_final_layernorm_with_cls_first():
    enc = build_vision_encoder("flamingo-debug-vit", None, "gelu").eval()
    v = enc.visual
    x = torch.randn(2, 3, 32, 32)
    feats = enc(x)
    assert feats.shape == (2, 1 + (32 // 8) ** 2, 48)
    with torch.no_grad():  # open_clip's own steps, spelled out
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.expand(2, 1, -1), t], dim=1) + v.positional_embedding
        t = v.transformer(v.ln_pre(t))
        pooled = v.ln_post(feats[:, 0]) @ v.proj  # ln_post + projection of our CLS = open_clip's output
        assert torch.equal(feats, t)
        torch.testing.assert_close(pooled, v(x), rtol=1e-5, atol=1e-6)
    assert not feats.requires_grad


def test_weights_load_from_a_local_file(tmp_path):
    import open_clip

    build_vision_encoder("flamingo-debug-vit", None, "gelu")  # registers the debug config
    torch.manual_seed(5)
    model = open_clip.create_model("flamingo-debug-vit")
    path = tmp_path / "weights.bin"
    torch.save(model.state_dict(), path)
    torch.manual_seed(6)
    enc = build_vision_encoder("flamingo-debug-vit", str(path), "gelu")
    for (n, a), (_, b) in zip(enc.visual.state_dict().items(), model.visual.state_dict().items()):
        assert torch.equal(a, b), n


def test_missing_weights_file_and_unknown_model_are_named():
    with pytest.raises(FileNotFoundError, match="model.vision.pretrained"):
        build_vision_encoder("flamingo-debug-vit", "/nonexistent/w.bin", "gelu")
    with pytest.raises(ValueError, match="model.vision.model_name"):
        build_vision_encoder("ViT-Nope-99", None, "gelu")


def test_quick_gelu_is_selectable():
    from open_clip.transformer import QuickGELU

    enc = build_vision_encoder("flamingo-debug-vit", None, "quick_gelu")
    assert any(isinstance(m, QuickGELU) for m in enc.modules())
    enc = build_vision_encoder("flamingo-debug-vit", None, "gelu")
    assert not any(isinstance(m, QuickGELU) for m in enc.modules())
