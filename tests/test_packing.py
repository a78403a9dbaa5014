"""Packed documents do not see each other: not their images (image mask and cross-attention
outputs), and with per-document self-attention not their tokens either."""

import pytest
import torch

from flamingo_dist.config.load import load_config


@pytest.fixture(scope="module")
def model(world1):
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model

    cfg = load_config(None, [])
    m = build_model(cfg.model, tp_group(), seed=3, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, block in m.xattn_blocks():
            block.alpha_cross_attn.fill_(0.7)
            block.alpha_dense.fill_(0.7)
    return m


def docs(seed: int):
    """Three documents: (items, images) with PIL images, shapes drawn from `seed`."""
    import random

    from flamingo_dist.data.formats import Document, Media
    from flamingo_dist.data.synthetic import make_document

    rng = random.Random(seed)
    out = []
    for i in range(3):
        items, images = make_document(rng, max_images=2)
        doc = []
        for it in items:
            if it in images:
                import io

                buf = io.BytesIO()
                images[it].save(buf, format="PNG")
                doc.append(Media([buf.getvalue()]))
            else:
                doc.append(it)
        out.append(Document(doc, key=f"d{i}"))
    return out


def packed(tokenizer, documents, per_document: bool, seq_len: int = 128):
    from flamingo_dist.data.processing import Processor

    proc = Processor(tokenizer, seq_len=seq_len, max_images=6, image_size=32, per_document_attention=per_document)
    encoded = [proc.encode(d) for d in documents]
    assert all(proc.fits(encoded[:i], encoded[i]) for i in range(len(encoded))), "the test documents must fit"
    row = proc.sequence(encoded)
    return {k: v[None] for k, v in row.items()}, encoded


def run(model, batch):
    from flamingo_dist.data.processing import normalize_pixels

    with torch.no_grad():
        return model.logits(batch["input_ids"], normalize_pixels(batch["pixel_values"]), batch["image_attention_mask"],
                            position_ids_BT=batch["position_ids"], document_ids_BT=batch.get("document_ids"))


def test_no_token_sees_an_image_of_another_document(tokenizer):
    batch, encoded = packed(tokenizer, docs(0), per_document=True)
    doc_of_token = batch["document_ids"][0]
    doc_of_image = torch.tensor([d for d, e in enumerate(encoded, start=1) for _ in e.pixels])
    mask = batch["image_attention_mask"][0]
    t, n = mask.nonzero(as_tuple=True)
    assert len(t) > 0 and len(doc_of_image) >= 4
    assert torch.equal(doc_of_token[t], doc_of_image[n])
    # every image is seen by the tokens of its own document (the mask is not empty by accident)
    assert set(n.tolist()) == set(range(len(doc_of_image)))
    # positions restart at each document; labels never predict a document's first token from another's
    starts = [0] + [sum(len(e.ids) for e in encoded[:i]) for i in range(1, len(encoded))]
    assert [int(batch["position_ids"][0, s]) for s in starts] == [0] * len(starts)
    assert all(int(batch["labels"][0, s]) == -100 for s in starts)


@pytest.mark.parametrize("per_document", [True, False])
def test_cross_attention_of_a_document_ignores_the_images_of_the_others(model, tokenizer, per_document):
    """The first cross-attention block (before layer 0) sees embeddings only: changing the first
    document's images must not change its outputs for the other documents' tokens."""
    batch, encoded = packed(tokenizer, docs(0), per_document)
    n1 = len(encoded[0].pixels)
    other = batch["pixel_values"].clone()
    other[0, :n1] = torch.randint_like(other[0, :n1], 0, 256)
    outputs = []
    block = model.layers[0].xattn
    handle = block.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach().clone()))
    try:
        run(model, batch)
        run(model, {**batch, "pixel_values": other})
    finally:
        handle.remove()
    first = len(encoded[0].ids)
    assert torch.equal(outputs[0][0, first:], outputs[1][0, first:])
    assert not torch.equal(outputs[0][0, :first], outputs[1][0, :first])  # the first document's do change


def test_with_per_document_attention_document_1_changes_no_logit_of_document_2(model, tokenizer):
    a, b = docs(0), docs(1)
    changed = [b[0], a[1], a[2]]  # another first document (text and images), same documents 2 and 3
    base, enc = packed(tokenizer, a, True)
    alt, enc_alt = packed(tokenizer, changed, True)
    la, lb = run(model, base), run(model, alt)
    s_a, s_b = len(enc[0].ids), len(enc_alt[0].ids)
    n = len(enc[1].ids) + len(enc[2].ids)
    assert s_a != s_b or not torch.equal(base["input_ids"][0, :s_a], alt["input_ids"][0, :s_b])
    torch.testing.assert_close(la[0, s_a:s_a + n], lb[0, s_b:s_b + n], rtol=1e-5, atol=1e-5)
    # and equal to document 2 alone in its own sequence
    alone, _ = packed(tokenizer, a[1:2], True)
    m = len(enc[1].ids)
    torch.testing.assert_close(la[0, s_a:s_a + m], run(model, alone)[0, :m], rtol=1e-5, atol=1e-5)
    # without it (IDEFICS' packing) document 2 does see document 1 through self-attention
    base_c, _ = packed(tokenizer, a, False)
    alt_c, _ = packed(tokenizer, changed, False)
    lc, ld = run(model, base_c), run(model, alt_c)
    assert not torch.allclose(lc[0, s_a:s_a + n], ld[0, s_b:s_b + n], rtol=1e-3, atol=1e-3)


def test_video_frames_get_time_embeddings_and_are_resampled_together(world1):
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model

    cfg = load_config(None, ["model.resampler.max_frames=4"])
    m = build_model(cfg.model, tp_group(), seed=3, dtype=torch.float32).eval()
    with torch.no_grad():
        m.resampler.frame_embs.normal_()
    clip = torch.randn(1, 2, 3, 3, 32, 32)  # [B, N media, F frames, C, H, W]
    with torch.no_grad():
        media = m.encode_media(clip)
        swapped = m.encode_media(clip[:, :, [1, 0, 2]])
        single = m.encode_media(clip[:, :, :1])
        image = m.encode_media(clip[:, :, 0])
    assert media.shape == (1, 2 * cfg.model.resampler.num_latents, m.vision.width)
    assert not torch.allclose(media, swapped)  # frame order matters (time embeddings)
    assert not torch.allclose(single, image)  # a one-frame video carries its time embedding; an image none
    with pytest.raises(ValueError, match="5 frames.*time embeddings for 4"):
        m.encode_media(torch.randn(1, 1, 5, 3, 32, 32))


def with_packed_attention(model, kind: str, fn):
    before = model.packed_attention
    model.packed_attention = kind
    try:
        return fn()
    finally:
        model.packed_attention = before


def test_flex_attention_gives_the_masked_logits(model, tokenizer):
    """model.packed_attention=flex: FlexAttention's compiled kernel with the documents' block mask
    against scaled_dot_product_attention with the boolean mask (forward: what CPU can run)."""
    batch, encoded = packed(tokenizer, docs(0), True)
    assert len(set(batch["document_ids"][0].tolist()) - {0}) == 3
    masked = with_packed_attention(model, "mask", lambda: run(model, batch))
    flex = with_packed_attention(model, "flex", lambda: run(model, batch))
    torch.testing.assert_close(flex, masked, rtol=1e-5, atol=1e-5)
    # not vacuous: without the documents' mask (one causal sequence) the logits differ
    whole = dict(batch)
    whole.pop("document_ids")
    assert not torch.allclose(with_packed_attention(model, "flex", lambda: run(model, whole)), masked,
                              rtol=1e-3, atol=1e-3)


def flex_and_masked_gradients(model, batch, device: str):
    """(loss, trainable gradients) with each packed attention, the model on `device`."""
    from flamingo_dist.data.processing import normalize_pixels
    from flamingo_dist.training.engine import apply_freeze

    apply_freeze(model)
    model.to(device).train()
    b = {k: v.to(device) for k, v in batch.items()}
    out = {}
    for kind in ("mask", "flex"):
        model.zero_grad(set_to_none=True)
        model.packed_attention = kind
        loss, _ = model(b["input_ids"], normalize_pixels(b["pixel_values"]), b["image_attention_mask"],
                        position_ids_BT=b["position_ids"], document_ids_BT=b["document_ids"], labels_BT=b["labels"])
        loss.backward()
        out[kind] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out


def assert_same_loss_and_gradients(out, rtol, atol):
    (loss_m, grads_m), (loss_f, grads_f) = out["mask"], out["flex"]
    torch.testing.assert_close(loss_f, loss_m, rtol=rtol, atol=atol)
    assert grads_m.keys() == grads_f.keys() and len(grads_m) > 0
    for name in grads_m:
        assert grads_m[name].abs().sum() > 0, f"{name}: no gradient at all"
        torch.testing.assert_close(grads_f[name], grads_m[name], rtol=rtol, atol=atol, msg=name)


def fresh_model(world1, *sets: str):
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model

    m = build_model(load_config(None, list(sets)).model, tp_group(), seed=3, dtype=torch.float32)
    with torch.no_grad():
        for _, block in m.xattn_blocks():
            block.alpha_cross_attn.fill_(0.7)
            block.alpha_dense.fill_(0.7)
    return m


def test_flex_attention_gives_the_masked_gradients_through_its_reference_backward(world1, tokenizer, monkeypatch):
    """torch 2.14 refuses FlexAttention's backward on CPU (its fused kernels are GPU-only), so here
    the block mask's loss and gradients go through FlexAttention's uncompiled reference
    implementation, the CPU guard lifted; the compiled GPU kernel's gradients are the test below,
    run by tools/gpu_check.sh on a GPU."""
    import torch.nn.attention.flex_attention as fa

    import flamingo_dist.models.lm as lm

    with pytest.raises(NotImplementedError, match="backward on CPU"):  # what the guard protects
        q = torch.randn(1, 1, 128, 8, requires_grad=True)
        fa.flex_attention(q, q, q)
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)
    monkeypatch.setattr(lm, "flex_attention_kernel", lambda: fa.flex_attention)
    batch, _ = packed(tokenizer, docs(0), True)
    assert_same_loss_and_gradients(flex_and_masked_gradients(fresh_model(world1), batch, "cpu"), 1e-5, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_attention_gives_the_masked_gradients_on_gpu(world1, tokenizer):
    # 4 heads of 16: inductor's flex kernels need a head dimension of at least 16 (the debug
    # flavor's 8 heads of 8 failed there with "must be at least 16 but got E=8")
    batch, _ = packed(tokenizer, docs(0), True)
    model = fresh_model(world1, "model.lm.num_heads=4")
    assert model.lm.layers[0].head_dim == 16
    assert_same_loss_and_gradients(flex_and_masked_gradients(model, batch, "cuda"), 1e-4, 1e-5)
