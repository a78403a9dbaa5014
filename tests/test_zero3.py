"""ZeRO-3 partitions only what trains (training/engine.py `Trainables`): no frozen parameter is a
ZeRO-3 parameter, a step all-gathers the trainable partitions and nothing else, and the losses,
gradient norms and gradients are ZeRO-2's."""

import json
import os

import pytest
import torch
from distributed import run_distributed
from test_trainer import REPO, make_trainer

STEPS = 3


def zero3_config() -> dict:
    with open(os.path.join(REPO, "ds_configs", "zero3.json")) as f:
        return json.load(f)  # its "auto" persistence threshold is 0: every trainable is gathered


def _train(trainer, counter=None) -> dict:
    """STEPS + 1 steps: every trainable's full gradient taken in the first (before the optimizer
    step, from the same weights in both runs), the collectives of the last counted when a counter
    is given (ZeRO-3 records its trace in the first two steps; gathering outside the modules' calls
    makes it record again: so nothing is gathered by hand in between)."""
    import contextlib

    from deepspeed.utils import safe_get_full_grad

    grads, apply = {}, trainer._apply

    def spy(read):  # after the last backward, before the optimizer
        grads.update({n: safe_get_full_grad(p).clone() for n, p in trainer.model.named_parameters()
                      if p.requires_grad})
        trainer._apply = apply
        return apply(read)

    trainer._apply = spy
    rows = []
    for i in range(STEPS + 1):
        with counter if counter is not None and i == STEPS else contextlib.nullcontext():
            m = trainer.train_step()
        rows.append((m["loss"], m["grad_norm"]))
    return {"rows": rows, "grads": grads}


def _zero3_against_zero2(layout, corpus, run_dir):
    from flamingo_dist.distributed.commcount import CollectiveCounter

    # Adam's eps well above the gradients' rounding: an element whose gradient is near 0 would
    # otherwise turn the two reductions' different rounding into an update of a full learning rate
    # (m / sqrt(v) ~ +-1 for any tiny m), and the losses of later steps would differ by that rounding
    # amplified (seen at 1.7e-5 on one CPU and below 1e-6 on another), not by anything ZeRO-3 does
    sets = [f"train.steps={STEPS + 1}", "train.precision=fp32", "model.xattn.alpha_init=0.5", "train.warmup_steps=0",
            "train.eps=1e-3"]
    z3 = make_trainer(layout, corpus, f"{run_dir}/z3", zero3_config(), *sets)
    from deepspeed.utils import get_z3_leaf_modules

    zero3_names = sorted(n for n, p in z3.model.named_parameters() if hasattr(p, "ds_id"))
    leaves = sorted(type(m).__name__ for m in get_z3_leaf_modules(z3.engine.module))
    trainable = sorted(n for n, p in z3.model.named_parameters() if p.requires_grad)
    shard_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in z3.model.parameters()
                      if hasattr(p, "ds_id"))
    counter = CollectiveCounter()
    ours = _train(z3, counter)
    gathered = {k: v for k, v in counter.summary().items() if k.startswith("all_gather")}
    z2 = make_trainer(layout, corpus, f"{run_dir}/z2", 2, *sets)
    return {"zero3": zero3_names, "leaves": leaves, "trainable": trainable, "shard_bytes": shard_bytes, "gathered": gathered,
            "z3": ours, "z2": _train(z2)}


def test_zero3_partitions_only_the_trainables_and_trains_as_zero2(synthetic_corpus, tmp_path):
    for rank, r in enumerate(run_distributed(_zero3_against_zero2, 2, 1, tmp_path / "out", synthetic_corpus,
                                             str(tmp_path / "run"))):
        # no frozen parameter is DeepSpeed's: the ZeRO-3 parameters are exactly the trainable ones
        assert r["zero3"] == r["trainable"] and len(r["trainable"]) == 51
        # each trainable block is gathered whole (training/engine.py zero3_leaf_classes): 2 cross-attention
        # blocks, and the attention and MLP of the resampler's 2 layers
        assert r["leaves"] == ["GatedCrossAttentionBlock"] * 2 + ["ResamplerAttention"] * 2 + ["ResamplerMLP"] * 2
        # a step gathers every trainable partition once and nothing else: the gathered trainables stay
        # whole from their forward use to their backward use (far fewer than stage3_max_live_parameters
        # and stage3_max_reuse_distance); in how many calls depends on the prefetch bucket
        assert list(r["gathered"]) == ["all_gather_into_tensor/2"], r["gathered"]
        assert r["gathered"]["all_gather_into_tensor/2"]["bytes"] == r["shard_bytes"], r["gathered"]
        z3, z2 = r["z3"], r["z2"]
        for step, ((loss3, norm3), (loss2, norm2)) in enumerate(zip(z3["rows"], z2["rows"]), start=1):
            assert loss3 == pytest.approx(loss2, rel=1e-5, abs=0), f"rank {rank} step {step}"
            assert norm3 == pytest.approx(norm2, rel=1e-5), f"rank {rank} step {step}"
        # every gradient, from the same weights (step 1); the losses and norms of every step above are
        # what the updates lead to
        assert z3["grads"].keys() == z2["grads"].keys() and len(z3["grads"]) == 51
        for name, g in z3["grads"].items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(g, z2["grads"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} gradient {n}: {m}")
