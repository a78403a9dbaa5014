"""Export to transformers' IdeficsForVisionText2Text: stock IDEFICS on the exported directory
gives our logits (the external reference for the whole model's semantics)."""

import pytest
import torch

from flamingo_dist.config.load import load_config


def trained_like(world1, *sets, seed: int = 11):
    """A debug model whose trainable weights are all random (gates open), as after training
    (`world1`: an initialised process group; `sets`: config overrides, TP size included)."""
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model
    from flamingo_dist.training.engine import apply_freeze

    cfg = load_config(None, list(sets))
    model = build_model(cfg.model, tp_group(), seed=seed)
    apply_freeze(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.5 if "alpha" in name else 0.05
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval(), cfg


def inputs(V: int):
    from flamingo_dist.data.layout import image_attention_mask

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 22), generator=g)
    ids[:, 0] = 1
    for p in (3, 10):  # <fake><image><fake>
        ids[:, p - 1], ids[:, p], ids[:, p + 1] = V, V + 1, V
    ids[1, 16] = 2  # an </s> inside: later tokens of row 1 see no image
    return ids, torch.randn(2, 2, 3, 32, 32, generator=g), image_attention_mask(ids, V + 1, 2, 2)


@pytest.mark.parametrize("alpha_type,theta", [("float", 10000.0), ("vector", 10000.0), ("vector", 500000.0)])
def test_stock_idefics_on_the_export_gives_our_logits(world1, tmp_path, alpha_type, theta):
    from transformers import IdeficsForVisionText2Text

    from flamingo_dist.hf.export_idefics import export_idefics

    model, cfg = trained_like(world1, "model.xattn.qk_layer_norms=true", f"model.xattn.alpha_type={alpha_type}",
                              f"model.lm.rope_theta={theta}")
    export_idefics(model, cfg.model, str(tmp_path / "hf"))
    hf = IdeficsForVisionText2Text.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    ids, pixels, mask = inputs(cfg.model.lm.vocab_size)
    with torch.no_grad():
        ours = model.logits(ids, pixels, mask)
        theirs = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
    assert ours.shape == theirs.shape == (2, 22, cfg.model.lm.vocab_size + 2)
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    with torch.no_grad():  # and the images matter, so the comparison covers the vision path
        assert (model.logits(ids, torch.randn_like(pixels), mask) - ours).abs().max() > 1e-2
    # greedy generation of 20 tokens: the same tokens as stock IDEFICS' generate
    from flamingo_dist.eval.generate import greedy

    prompt = ids[:, :14]  # ends after the second image, before row 1's </s>
    mine = greedy(model, prompt, pixels, mask[:, :14], 20, stop_token_ids=(2,), pad_token_id=0)
    out = hf.generate(input_ids=prompt, pixel_values=pixels, image_attention_mask=mask[:, :14], max_new_tokens=20,
                      do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=0)
    theirs = out[:, 14:]
    assert mine.shape == theirs.shape and mine.shape[1] >= 1
    assert torch.equal(mine, theirs), f"ours {mine.tolist()} vs IDEFICS {theirs.tolist()}"
    from flamingo_dist.eval.generate import beam_search

    finished_early = []
    for row in range(2):  # and beam search with 3 beams, as transformers' generate does it
        ours_beam = beam_search(model, prompt[row:row + 1], pixels[row:row + 1], mask[row:row + 1, :14], 12,
                                num_beams=3, stop_token_ids=(2,))
        hf_beam = hf.generate(input_ids=prompt[row:row + 1], pixel_values=pixels[row:row + 1],
                              image_attention_mask=mask[row:row + 1, :14], max_new_tokens=12, do_sample=False,
                              num_beams=3, eos_token_id=2, pad_token_id=0)[:, 14:]
        assert torch.equal(ours_beam, hf_beam), f"beam: ours {ours_beam.tolist()} vs IDEFICS {hf_beam.tolist()}"
        for k in (0, 3):  # stop tokens the beams do produce: hypotheses finish early, as with </s>
            stop = int(ours_beam[0, k])
            ours_eos = beam_search(model, prompt[row:row + 1], pixels[row:row + 1], mask[row:row + 1, :14], 12,
                                   num_beams=3, stop_token_ids=(stop,))
            hf_eos = hf.generate(input_ids=prompt[row:row + 1], pixel_values=pixels[row:row + 1],
                                 image_attention_mask=mask[row:row + 1, :14], max_new_tokens=12, do_sample=False,
                                 num_beams=3, eos_token_id=stop, pad_token_id=0)[:, 14:]
            assert torch.equal(ours_eos, hf_eos), (stop, ours_eos.tolist(), hf_eos.tolist())
            finished_early.append(ours_eos.shape[1] < 12)
    assert any(finished_early)  # the stop-token rules were exercised


@pytest.mark.parametrize("sets,reason", [
    (["model.lm.num_kv_heads=2"], "grouped-query attention"),
    (["model.xattn.cross_layer_interval=3"], "not a multiple of cross_layer_interval"),
    (["model.xattn.placement=openflamingo", "model.xattn.cross_layer_interval=2"], "placement 'openflamingo'"),
    (["model.resampler.max_frames=8"], "video time embeddings"),
])
def test_unrepresentable_models_are_refused_with_the_reason(world1, tmp_path, sets, reason):
    from flamingo_dist.hf.export_idefics import ExportError, export_idefics

    model, cfg = trained_like(world1, *sets)
    with pytest.raises(ExportError, match=reason):
        export_idefics(model, cfg.model, str(tmp_path / "hf"))


@pytest.mark.parametrize("change,reason", [
    ({"ls_init_value": 0.1}, "layer scale"),
    ({"attentional_pool": True}, "attentional pooling"),
])
def test_vision_towers_that_are_not_a_plain_vit_are_refused(tmp_path, change, reason):
    import json
    import os

    import open_clip

    from flamingo_dist.hf.export_idefics import ExportError, check_exportable
    from flamingo_dist.models import vision

    with open(os.path.join(vision._ASSETS, "flamingo-debug-vit.json")) as f:
        spec = json.load(f)
    spec["vision_cfg"].update(change)
    name = f"flamingo-test-{reason.replace(' ', '-')}"
    with open(tmp_path / f"{name}.json", "w") as f:
        json.dump(spec, f)
    open_clip.add_model_config(str(tmp_path / f"{name}.json"))
    visual = open_clip.create_model(name).visual
    with pytest.raises(ExportError, match=reason):
        check_exportable(load_config(None, []).model, visual)
    plain = vision.build_vision_encoder("flamingo-debug-vit", None, "gelu").visual
    check_exportable(load_config(None, []).model, plain)  # the unchanged tower passes
