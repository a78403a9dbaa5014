"""Import a transformers IDEFICS checkpoint (fine-tune IDEFICS with this stack) at TP=1 and
TP=2, and the round trip ours -> IDEFICS -> ours."""

import torch
from distributed import run_distributed


def save_random_idefics(path: str, alpha_type: str = "vector") -> None:
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    cfg = IdeficsConfig(
        vocab_size=120, additional_vocab_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=True, alpha_type=alpha_type,
        alpha_initializer="zeros", use_resampler=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        vision_config=dict(embed_dim=48, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=192, hidden_act="gelu"),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=8, qk_layer_norms_perceiver=True))
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(cfg)
    with torch.no_grad():  # open the gates and perturb every norm, so every path matters
        for name, p in model.named_parameters():
            if "alpha" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path, safe_serialization=True)


def inputs(V: int = 120):
    from flamingo_dist.data.layout import image_attention_mask

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (2, 18), generator=g)
    for p in (2, 9):
        ids[:, p - 1], ids[:, p], ids[:, p + 1] = V, V + 1, V
    return ids, torch.randn(2, 2, 3, 32, 32, generator=g), image_attention_mask(ids, V + 1, 2, 2)


def _our_logits(layout, path):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model, resolve_model_config

    cfg = load_config(None, ["model.synthetic_backbones=null", f"model.init_from={path}",
                             f"parallel.tensor_parallel_size={layout.tp_size}"])
    resolve_model_config(cfg.model)
    model = build_model(cfg.model, tp_group(), seed=0).eval()
    with torch.no_grad():
        return model.logits(*inputs())


def test_imported_idefics_gives_its_logits_at_tp1_and_tp2(tmp_path):
    from transformers import IdeficsForVisionText2Text

    path = str(tmp_path / "idefics")
    save_random_idefics(path)
    hf = IdeficsForVisionText2Text.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids, pixels, mask = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
    for tp in (1, 2):
        for ours in run_distributed(_our_logits, tp, tp, tmp_path / f"tp{tp}", path):
            rel = (ours - ref).abs().max() / ref.abs().max()
            assert rel <= 1e-4, f"TP={tp}: relative error {rel:.2e}"


def _round_trip(layout, out_dir):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.hf.export_idefics import export_idefics
    from flamingo_dist.training.build import build_model, resolve_model_config

    cfg = load_config(None, ["model.xattn.qk_layer_norms=true", "model.resampler.qk_layer_norms=true"])
    model = build_model(cfg.model, tp_group(), seed=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        V = cfg.model.lm.vocab_size  # rows past V of the padded vocabulary are structurally zero
        model.lm.embed_tokens.weight[V:] = 0
        model.lm.lm_head.weight[V:] = 0
    export_idefics(model, cfg.model, out_dir)
    back_cfg = load_config(None, ["model.synthetic_backbones=null", f"model.init_from={out_dir}"])
    resolve_model_config(back_cfg.model)
    back = build_model(back_cfg.model, tp_group(), seed=99)
    a, b = model.state_dict(), back.state_dict()
    keys = [k for k in a if not k.endswith("vision.visual.proj")]  # IDEFICS keeps no CLIP projection (unused)
    differ = [k for k in keys if not torch.equal(a[k], b[k])]
    return len(keys), differ, sorted(set(b) - set(a))


def test_round_trip_ours_to_idefics_to_ours_is_the_identity(tmp_path):
    (n, differ, extra), = run_distributed(_round_trip, 1, 1, tmp_path / "out", str(tmp_path / "hf"))
    assert n > 100 and differ == [] and extra == []
