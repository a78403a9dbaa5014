"""Model semantics on one process: gates at zero, image masking, activation checkpointing."""

import pytest
import torch

from flamingo_dist.config.load import load_config


def build(world1, **sets):
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model

    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    return build_model(cfg.model, tp_group(), seed=3, dtype=torch.float32).eval(), cfg


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for _, block in model.xattn_blocks():
            block.alpha_cross_attn.fill_(value)
            block.alpha_dense.fill_(value)


def two_image_batch(V: int, T: int = 24, p1: int = 5, p2: int = 13):
    """One sequence with <image> tokens at p1 and p2 (each wrapped in fake tokens) and the IDEFICS
    image mask: tokens p1..p2-1 see image 0, tokens from p2 on see image 1."""
    from flamingo_dist.data.layout import image_attention_mask

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (1, T), generator=g)
    ids[0, 0] = 1
    for p in (p1, p2):
        ids[0, p - 1], ids[0, p], ids[0, p + 1] = V, V + 1, V
    mask = image_attention_mask(ids, V + 1, 2, num_images=2)
    return ids, mask


def test_zero_gates_give_the_bare_lm_exactly(world1):
    model, cfg = build(world1)
    V = cfg.model.lm.vocab_size
    ids, mask = two_image_batch(V)
    pixels = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        flamingo = model.logits(ids, pixels, mask)
        bare = model.lm.gather_logits(model.lm(ids))
    assert model.xattn_layer_indices == [0, 1]
    assert torch.equal(flamingo, bare)
    set_gates(model, 0.5)  # and the comparison is not vacuous:
    with torch.no_grad():
        assert not torch.equal(model.logits(ids, pixels, mask), bare)


@pytest.mark.parametrize("alpha_type", ["float", "vector"])
def test_image1_does_not_reach_cross_attention_at_or_after_image2(world1, alpha_type):
    model, cfg = build(world1, **{"model.xattn.alpha_type": alpha_type})
    set_gates(model, 0.5)
    V, p1, p2 = cfg.model.lm.vocab_size, 5, 13
    ids, mask = two_image_batch(V, p1=p1, p2=p2)
    pixels_a = torch.randn(1, 2, 3, 32, 32)
    pixels_b = pixels_a.clone()
    pixels_b[0, 0] = torch.randn(3, 32, 32)  # change image 1 only
    from flamingo_dist.models.xattn import expand_image_mask

    with torch.no_grad():
        media_a, media_b = model.encode_media(pixels_a), model.encode_media(pixels_b)
        bias, has_image = expand_image_mask(mask, model.num_latents, torch.float32)
        x = torch.randn(1, ids.shape[1], cfg.model.lm.hidden_size)
        for i, block in model.xattn_blocks():
            out_a, out_b = block(x, media_a, bias, has_image), block(x, media_b, bias, has_image)
            assert torch.equal(out_a[:, p2:], out_b[:, p2:]), f"block {i}: image 1 leaked past image 2"
            assert not torch.equal(out_a[:, p1:p2], out_b[:, p1:p2]), f"block {i}: image 1 unused"
            assert torch.equal(out_a[:, :p1], out_b[:, :p1])


def test_no_logit_before_the_first_image_depends_on_any_image(world1):
    model, cfg = build(world1)
    set_gates(model, 0.5)
    ids, mask = two_image_batch(cfg.model.lm.vocab_size, p1=5, p2=13)
    with torch.no_grad():
        a = model.logits(ids, torch.randn(1, 2, 3, 32, 32), mask)
        b = model.logits(ids, torch.randn(1, 2, 3, 32, 32), mask)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.equal(a[:, 5:], b[:, 5:])


def test_tokens_without_image_get_zero_cross_attention_but_pass_the_mlp(world1):
    from flamingo_dist.models.xattn import expand_image_mask

    model, cfg = build(world1)
    set_gates(model, 0.5)
    _, block = model.xattn_blocks()[0]
    T, D = 6, cfg.model.lm.hidden_size
    x = torch.randn(1, T, D)
    media = torch.randn(1, model.num_latents, model.vision.width)
    mask = torch.zeros(1, T, 1, dtype=torch.long)
    bias, has_image = expand_image_mask(mask, model.num_latents, torch.float32)
    with torch.no_grad():
        out = block(x, media, bias, has_image)
        mlp_only = x + torch.tanh(block.alpha_dense) * block.down_proj(
            torch.nn.functional.silu(block.gate_proj(block.post_attention_layernorm(x)))
            * block.up_proj(block.post_attention_layernorm(x)))
    assert torch.equal(out, mlp_only)


@pytest.mark.parametrize("placement,expected", [("idefics", [0, 2]), ("openflamingo", [1, 3])])
def test_placement(placement, expected):
    from flamingo_dist.config.schema import xattn_layer_indices

    shape = ["model.synthetic_backbones=null", "model.lm.num_layers=4", "model.xattn.cross_layer_interval=2"]
    cfg = load_config(None, [*shape, f"model.xattn.placement={placement}"])
    assert xattn_layer_indices(cfg.model) == expected
    cfg = load_config(None, [*shape, "model.xattn.placement=explicit", "model.xattn.layers=[3, 1]"])
    assert xattn_layer_indices(cfg.model) == [1, 3]


def test_activation_checkpointing_gives_the_same_gradients(world1):
    from flamingo_dist.training.engine import apply_activation_checkpointing, apply_freeze

    model, cfg = build(world1)
    set_gates(model, 0.3)
    apply_freeze(model)
    model.train()
    ids, mask = two_image_batch(cfg.model.lm.vocab_size)
    pixels = torch.randn(1, 2, 3, 32, 32)
    labels = ids.clone()

    def grads(m):
        m.zero_grad(set_to_none=True)
        loss, _ = m(ids, pixels, mask, labels_BT=labels)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    plain = grads(model)
    ckpt_model, _ = build(world1)  # same seed: the same weights
    set_gates(ckpt_model, 0.3)
    apply_freeze(ckpt_model)
    ckpt_model.train()
    apply_activation_checkpointing(ckpt_model)
    calls = []
    ckpt_model.layers[1].decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    ckpt = grads(ckpt_model)
    assert len(calls) == 2, "activation checkpointing did not recompute the layer in backward"
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        assert plain[name].abs().sum() > 0, f"{name}: no gradient at all"
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)
    # the frozen parts got no gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="inductor's GPU kernels (run by tools/gpu_check.sh)"))])
def test_compiled_units_give_the_same_loss_and_gradients(world1, checkpointing, device):
    """train.compile: each (xattn, layer) unit through torch.compile (inductor: C++ on CPU,
    Triton on GPU) against the eager model, with and without activation checkpointing around it."""
    from flamingo_dist.training.engine import apply_activation_checkpointing, apply_compile, apply_freeze

    def prepared(compiled: bool):
        model, cfg = build(world1)
        set_gates(model, 0.3)
        apply_freeze(model)
        model.to(device).train()
        if checkpointing:
            apply_activation_checkpointing(model)
        if compiled:
            apply_compile(model)
        return model, cfg

    eager, cfg = prepared(False)
    compiled, _ = prepared(True)
    calls = []
    for layer in compiled.layers:
        unit = layer.compiled_forward
        assert hasattr(unit, "_torchdynamo_orig_callable"), "the unit is not a torch.compile'd function"
        layer.compiled_forward = lambda *a, _unit=unit: calls.append(1) or _unit(*a)
    ids, mask = (t.to(device) for t in two_image_batch(cfg.model.lm.vocab_size))
    pixels = torch.randn(1, 2, 3, 32, 32).to(device)

    def loss_and_grads(m):
        loss, _ = m(ids, pixels, mask, labels_BT=ids)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    loss_c, grads_c = loss_and_grads(compiled)
    assert len(calls) == len(compiled.layers) * (2 if checkpointing else 1), "the compiled units were not used"
    loss_e, grads_e = loss_and_grads(eager)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for name in grads_e:
        assert grads_e[name].abs().sum() > 0, f"{name}: no gradient at all"
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    # generation (a cache) stays eager and agrees with the compiled forward
    with torch.no_grad():
        torch.testing.assert_close(compiled.logits(ids, pixels, mask), eager.logits(ids, pixels, mask),
                                   rtol=1e-5, atol=1e-5)


def test_padding_media_slots_are_not_encoded_and_change_nothing(world1):
    """A batch of 3 slots per row where row 0 uses 2 and row 1 none (text only): the vision encoder
    sees only the 2 used images, and loss and every gradient equal those of encoding all 6."""
    from flamingo_dist.training.engine import apply_freeze

    model, cfg = build(world1)
    set_gates(model, 0.5)
    apply_freeze(model)
    model.train()
    V = cfg.model.lm.vocab_size
    ids, mask2 = two_image_batch(V)
    ids = ids.expand(2, -1).clone()
    mask = torch.zeros(2, ids.shape[1], 3, dtype=torch.long)
    mask[0, :, :2] = mask2[0]
    ids[1][ids[1] >= V] = 7  # row 1: the same text without images
    pixels = torch.randn(2, 3, 3, 32, 32)
    seen = []
    forward = model.vision.forward
    model.vision.forward = lambda x: seen.append(x.shape[0]) or forward(x)

    def loss_and_grads(skip: bool):
        model.skip_padding_media = skip
        model.zero_grad()
        loss, _ = model(ids, pixels, mask, labels_BT=ids.masked_fill(ids >= V, -100))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_skip, grads_skip = loss_and_grads(True)
    loss_all, grads_all = loss_and_grads(False)
    assert seen == [2, 6]
    torch.testing.assert_close(loss_skip, loss_all, rtol=1e-6, atol=1e-7)
    assert grads_skip.keys() == grads_all.keys() and any(g.abs().sum() > 0 for g in grads_skip.values())
    for name in grads_all:
        torch.testing.assert_close(grads_skip[name], grads_all[name], rtol=1e-5, atol=1e-7, msg=name)
    seen.clear()
    model.skip_padding_media = True
    model(ids[1:], pixels[1:], mask[1:])  # a text-only batch still runs the encoder, on one slot
    assert seen == [1]
