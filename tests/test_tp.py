"""The whole Flamingo model (cross-attention blocks with q/k norms included, gates open) is the
same function with the same gradients at TP=2 as at TP=1; replicated weights get the same
gradient on every TP rank."""

import torch
from distributed import run_distributed


def _forward_backward(layout, loss_chunk_tokens=0):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model
    from flamingo_dist.training.engine import apply_freeze

    cfg = load_config(None, [f"parallel.tensor_parallel_size={layout.tp_size}", "model.lm.num_kv_heads=2",
                             "model.xattn.alpha_type=vector", "model.xattn.qk_layer_norms=true"])
    model = build_model(cfg.model, tp_group(), seed=7)
    apply_freeze(model)
    with torch.no_grad():
        for _, block in model.xattn_blocks():
            block.alpha_cross_attn.fill_(0.5)
            block.alpha_dense.fill_(-0.4)
    g = torch.Generator().manual_seed(0)
    B, T, N, V = 2, 20, 2, cfg.model.lm.vocab_size
    ids = torch.randint(3, V, (B, T), generator=g)
    ids[:, 4], ids[:, 11] = V + 1, V + 1
    from flamingo_dist.data.layout import image_attention_mask

    mask = image_attention_mask(ids, V + 1, 2, N)
    pixels = torch.randn(B, N, 3, 32, 32, generator=g)
    loss, _ = model(ids, pixels, mask, labels_BT=ids, z_loss=1e-2, loss_chunk_tokens=loss_chunk_tokens)
    loss.backward()
    with torch.no_grad():
        logits = model.logits(ids, pixels, mask)
    grads = {}
    group = tp_group()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grad = p.grad
        if getattr(p, "tensor_model_parallel", False) and layout.tp_size > 1:
            parts = [torch.empty_like(grad) for _ in range(layout.tp_size)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=p.partition_dim)
        grads[name] = grad
    return loss.detach(), logits, grads


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, z: float) -> torch.Tensor:
    """Cross-entropy + z-loss on the full (gathered) logits, by hand."""
    lg, tg = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(lg, tg) + z * torch.logsumexp(lg, -1).pow(2).mean()


def test_tp2_equals_tp1_in_logits_loss_and_gradients(tmp_path):
    (ref_loss, ref_logits, ref_grads), = run_distributed(_forward_backward, 1, 1, tmp_path / "tp1")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 20), generator=g)
    ids[:, 4], ids[:, 11] = 513, 513
    torch.testing.assert_close(ref_loss, reference_loss(ref_logits, ids, 1e-2), rtol=1e-5, atol=0)
    for loss, logits, grads in run_distributed(_forward_backward, 2, 2, tmp_path / "tp2"):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert ref_grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_chunked_loss_equals_the_whole_loss_at_tp1_and_tp2(tmp_path):
    """train.loss_chunk_tokens: the head and loss on chunks of 7 positions (20 = 7 + 7 + 6), each
    recomputed in backward, give the loss and gradients of the whole-batch path, also with the
    vocabulary split over 2 TP ranks."""
    (ref_loss, _, ref_grads), = run_distributed(_forward_backward, 1, 1, tmp_path / "whole")
    chunked = run_distributed(_forward_backward, 1, 1, tmp_path / "tp1", 7)
    chunked += run_distributed(_forward_backward, 2, 2, tmp_path / "tp2", 7)
    for loss, _, grads in chunked:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _warnings_of_a_second_step(layout):
    import warnings

    _forward_backward(layout)  # megatron's one-time notes come with the first call
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _forward_backward(layout)
    return [str(w.message)[:80] for w in seen]


def test_a_tp2_step_warns_nothing(tmp_path):
    """megatron 0.16.1's RowParallelLinear passes tp_group=None to its matmul, which warns on rank
    0 in every call; our row layer passes the group (no warning, no warnings.warn in the step)."""
    for seen in run_distributed(_warnings_of_a_second_step, 2, 2, tmp_path / "tp2"):
        assert seen == []
