"""The frozen-aware FLOP formula against torch's own FLOP counter on a real training step."""

import pytest
import torch

from flamingo_dist.config.load import load_config


@pytest.mark.parametrize("sets", [[], ["model.lm.num_kv_heads=2", "model.xattn.cross_layer_interval=2"]])
@pytest.mark.parametrize("used_slots", [3, 1])
def test_formula_matches_flop_counter(world1, sets, used_slots):
    """All 3 slots attended to (all encoded), or only the first (the 2 padding slots per row are
    not encoded: `encoded_images` counts the batch's 2 real images)."""
    from torch.utils.flop_counter import FlopCounterMode

    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.models.flops import train_flops
    from flamingo_dist.training.build import build_model
    from flamingo_dist.training.engine import apply_freeze

    cfg = load_config(None, sets)
    model = build_model(cfg.model, tp_group(), seed=0)
    apply_freeze(model)
    B, T, N = 2, 24, 3
    ids = torch.randint(0, 512, (B, T))
    mask = torch.zeros(B, T, N, dtype=torch.long)
    for n in range(used_slots):
        mask[:, 4 + 4 * n:, n] = 1
    counter = FlopCounterMode(display=False)
    # The math backend spells attention out as matmuls, so the counter sees it (the fused CPU
    # kernel is invisible to it).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with counter, sdpa_kernel([SDPBackend.MATH]):
        loss, _ = model(ids, torch.randn(B, N, 3, 32, 32), mask, labels_BT=ids)
        loss.backward()
    measured = counter.get_total_flops()
    predicted = train_flops(cfg.model, model.vision.shape(), B, T, N, encoded_images=B * used_slots)
    assert abs(predicted - measured) / measured < 1e-9, (predicted, measured)
