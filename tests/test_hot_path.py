"""The frozen LM's hot path against what it replaced: plain F.linear at TP size 1 for megatron's
layers, F.rms_norm, RoPE on queries and keys at once, the packed mask built once as a float bias,
plain causal attention for one-document rows, the loader's media slots; and train.compile's
units as one graph each with no recompilation after warm-up."""

import pytest
import torch
from test_model import build, set_gates, two_image_batch


def test_tp1_linears_are_megatrons_parameters_through_plain_linear(world1):
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.models.lm import ColumnLinear, LocalLinear, RowLinear, TPLinears, _mp_config, _noinit

    linears = TPLinears(tp_group())
    assert isinstance(linears.column(16, 24), LocalLinear) and isinstance(linears.row(24, 16), LocalLinear)
    g = torch.Generator().manual_seed(0)
    for kind, theirs, ours, dim in (
            ("column", ColumnLinear(16, 24, config=_mp_config(1, torch.float32), init_method=_noinit, bias=False,
                                    gather_output=False, tp_group=tp_group()), linears.column(16, 24), 0),
            ("row", RowLinear(24, 16, config=_mp_config(1, torch.float32), init_method=_noinit, bias=False,
                              input_is_parallel=True, skip_bias_add=False, tp_group=tp_group()), linears.row(24, 16), 1)):
        assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}, kind
        assert ours.weight.shape == theirs.weight.shape and ours.weight.dtype == theirs.weight.dtype
        assert ours.weight.tensor_model_parallel and ours.weight.partition_dim == theirs.weight.partition_dim == dim
        with torch.no_grad():
            w = torch.randn(theirs.weight.shape, generator=g)
            theirs.weight.copy_(w)
            ours.weight.copy_(w)
        x = torch.randn(2, 5, theirs.weight.shape[1], generator=g, requires_grad=True)
        out_t, out_o = theirs(x), ours(x)
        torch.testing.assert_close(out_o, out_t, rtol=1e-6, atol=1e-6)
        gx_t, gw_t = torch.autograd.grad(out_t.square().sum(), (x, theirs.weight))
        gx_o, gw_o = torch.autograd.grad(out_o.square().sum(), (x, ours.weight))
        torch.testing.assert_close(gx_o, gx_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw_o, gw_t, rtol=1e-6, atol=1e-6)


def test_a_tp1_model_has_no_megatron_linear(world1):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    model, _ = build(world1)
    assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_explicit_formula_bit_for_bit(dtype):
    from flamingo_dist.models.common import RMSNorm

    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    norm = norm.to(dtype)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)

    def explicit(x):  # transformers' LlamaRMSNorm
        x32 = x.float()
        return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    ours, ref = norm(x), explicit(x)
    assert torch.equal(ours, ref)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_transformers_rotate_half_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from flamingo_dist.models.common import apply_rope, rope_cos_sin

    B, H, T, E = 2, 3, 9, 16
    positions = torch.arange(T).expand(B, T)
    cos, signed_sin = rope_cos_sin(positions, E, 10000.0, dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, E, 2, dtype=torch.int64).float() / E))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    q, k = torch.randn(B, H, T, E, dtype=dtype), torch.randn(B, H, T, E, dtype=dtype)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, emb.cos().to(dtype), emb.sin().to(dtype))
    assert torch.equal(cos[:, 0], emb.cos().to(dtype))
    assert torch.equal(apply_rope(q, cos, signed_sin), q_ref) and torch.equal(apply_rope(k, cos, signed_sin), k_ref)


def test_the_float_document_bias_is_the_boolean_mask():
    from flamingo_dist.models.flamingo import document_causal_bias, document_causal_mask

    docs = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2]])
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    by_bool = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(docs))
    bias = document_causal_bias(docs, torch.float32)
    by_bias = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(by_bias, by_bool, rtol=0, atol=1e-7)
    assert bias.dtype == torch.float32 and bias.shape == (2, 1, 7, 7)


def _loss_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, _ = model(*args, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_document_rows_need_no_mask(world1):
    """A row of one document and padding: plain causal attention (the collate drops the document
    ids) gives the same loss and gradients as the per-document mask."""
    from flamingo_dist.training.engine import apply_freeze

    model, cfg = build(world1)
    set_gates(model, 0.5)
    apply_freeze(model)
    model.train()
    V = cfg.model.lm.vocab_size
    ids, mask = two_image_batch(V, T=24)
    ids, mask = ids.expand(2, -1).clone(), mask.expand(2, -1, -1).clone()
    docs = torch.ones_like(ids)
    docs[0, 18:] = docs[1, 21:] = 0  # padding after the document
    labels = ids.masked_fill((ids >= V) | (docs == 0), -100)
    mask = mask * (docs > 0)[..., None]
    pixels = torch.randn(2, 2, 3, 32, 32)
    masked = _loss_and_grads(model, ids, pixels, mask, labels_BT=labels, document_ids_BT=docs)
    causal = _loss_and_grads(model, ids, pixels, mask, labels_BT=labels)
    torch.testing.assert_close(causal[0], masked[0], rtol=1e-6, atol=1e-7)
    for name, g in masked[1].items():
        torch.testing.assert_close(causal[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_loaders_media_slots_replace_the_reads_in_the_forward(world1):
    from flamingo_dist.training.engine import apply_freeze
    from flamingo_dist.training.opcount import StepCounter

    model, cfg = build(world1)
    set_gates(model, 0.5)
    apply_freeze(model)
    model.train()
    V = cfg.model.lm.vocab_size
    ids, mask = two_image_batch(V)
    mask = torch.cat([mask, torch.zeros_like(mask[..., :1])], dim=-1)  # a third, padding slot
    pixels = torch.randn(1, 3, 3, 32, 32)
    found = _loss_and_grads(model, ids, pixels, mask, labels_BT=ids)
    with StepCounter() as counter:
        given = _loss_and_grads(model, ids, pixels, mask, labels_BT=ids, media_slots_M=torch.tensor([0, 1]))
    assert sum(counter.reads.values()) == 0, counter.where
    assert torch.equal(given[0], found[0])
    assert all(torch.equal(given[1][n], g) for n, g in found[1].items())


def test_compiled_units_are_one_graph_each_and_do_not_recompile(world1):
    """train.compile at TP=1: every (xattn, layer) unit compiles with fullgraph=True (no graph
    break), once per kind of batch (packed rows with their mask, one-document rows without), and
    later steps compile nothing more."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from flamingo_dist.training.engine import apply_freeze

    torch._dynamo.reset()
    counters.clear()
    model, cfg = build(world1)
    set_gates(model, 0.3)
    apply_freeze(model)
    model.train()
    for layer in model.layers:
        layer.compile_unit(fullgraph=True)
    V = cfg.model.lm.vocab_size
    ids, mask = two_image_batch(V)
    ids, mask = ids.expand(2, -1).clone(), mask.expand(2, -1, -1).clone()
    pixels = torch.randn(2, 2, 3, 32, 32)
    packed = torch.ones_like(ids)
    packed[:, 16:] = 2

    def step(i: int):
        docs = packed if i % 2 == 0 else None
        loss, _ = model(ids, pixels * (1 + i), mask, labels_BT=ids, document_ids_BT=docs)
        loss.backward()

    step(0)
    step(1)  # warm-up: both kinds of batch seen
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for i in range(2, 6):
        step(i)
    assert counters["stats"]["unique_graphs"] == graphs, "a unit was compiled again after warm-up"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
