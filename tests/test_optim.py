"""Learning-rate schedule and weight-decay groups."""

import math

import torch

from flamingo_dist.config.schema import TrainConfig
from flamingo_dist.training.optim import lr_factor, param_groups


def test_warmup_then_cosine_to_min_ratio():
    t = TrainConfig(steps=12, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    f = [lr_factor(s, t) for s in range(12)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # non-increasing after warm-up
    assert math.isclose(lr_factor(12, t), 0.1) and math.isclose(lr_factor(7, t), 0.1 + 0.9 * 0.5)


def test_constant_after_warmup():
    t = TrainConfig(steps=10, warmup_steps=4, schedule="constant")
    assert [lr_factor(s, t) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_weight_decay_only_on_trainable_projection_matrices():
    model = torch.nn.ModuleDict({
        "q_proj": torch.nn.Linear(4, 4, bias=True),
        "input_layernorm": torch.nn.LayerNorm(4),
        "frozen": torch.nn.Linear(4, 4),
    })
    model["frozen"].requires_grad_(False)
    model.register_parameter("alpha_dense", torch.nn.Parameter(torch.zeros(1)))
    model.register_parameter("latents", torch.nn.Parameter(torch.zeros(3, 4)))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0
    assert [id(p) for p in decay["params"]] == [id(model["q_proj"].weight)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["q_proj.bias", "input_layernorm.weight", "input_layernorm.bias", "alpha_dense", "latents"])


def test_learning_rate_scales_split_the_groups_by_kind():
    model = torch.nn.ModuleDict({"resampler": torch.nn.Linear(4, 4, bias=False),
                                 "block": torch.nn.ModuleDict({"xattn": torch.nn.Linear(4, 4, bias=False)})})
    model["block"]["xattn"].register_parameter("alpha_dense", torch.nn.Parameter(torch.zeros(1)))
    groups = param_groups(model, 0.1, {"gates": 10.0, "resampler": 2.0})
    names = {id(p): n for n, p in model.named_parameters()}
    got = {(g["lr_scale"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert got == {(1.0, 0.1): ["block.xattn.weight"], (2.0, 0.1): ["resampler.weight"],
                   (10.0, 0.0): ["block.xattn.alpha_dense"]}
    assert (groups[0]["lr_scale"], groups[0]["weight_decay"]) == (1.0, 0.1)  # the base rate comes first


def test_the_fused_optimizer_updates_as_the_plain_one():
    """build_optimizer's fused AdamW (both weight-decay groups) against torch's reference
    single-tensor AdamW, over a few steps: the same weights to float rounding."""
    from flamingo_dist.training.optim import build_optimizer

    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    plain_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    plain_model.load_state_dict(fused_model.state_dict())
    start = fused_model[0].weight.detach().clone()
    t = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(fused_model, t)
    assert all(g["fused"] for g in fused.param_groups)
    plain = torch.optim.AdamW([dict(g, lr=t.lr) for g in param_groups(plain_model, t.weight_decay)], lr=t.lr,
                              betas=tuple(t.betas), eps=t.eps, foreach=False)
    x = torch.randn(8, 16)
    for _ in range(5):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (fused_model[0].weight - start).abs().max() > 1e-3  # and they did move
