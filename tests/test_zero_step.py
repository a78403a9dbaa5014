"""Our ZeRO step (training/zero_step.py) against DeepSpeed's own (train.fused_zero_step=false):
the same losses, gradient norms and weights, step by step, with clipping active, a planted
infinite gradient and a planted NaN loss skipped on every rank; and the step's host reads
(training/opcount.py): exactly one per optimizer step."""

import math

import pytest
import torch
from distributed import run_distributed
from test_trainer import make_trainer, nan_loss_at, snapshot

STEPS = 4
BF16_EPS = 2 ** -8  # bf16's unit roundoff (8 significant bits): half its machine epsilon
INF_GRAD_STEP, NAN_LOSS_STEP = 2, 4


def inf_grad_at(trainer, step: int, rank: int) -> None:
    """Fault injection: `rank`'s gradient of one cross-attention weight is infinite at `step` (the
    loss stays finite: only the gradient norm can tell). A TP-sharded weight: a replicated one
    holds the same gradient on every TP rank, so an inf there on one of them alone cannot happen."""
    p = next(p for n, p in trainer.model.named_parameters() if p.requires_grad and n.endswith("xattn.q_proj.weight"))
    p.register_hook(lambda g: g * float("inf") if trainer.state.step + 1 == step and
                    trainer.layout.rank == rank else g)


def _run(layout, corpus, run_dir, stage, fused, precision):
    trainer = make_trainer(layout, corpus, run_dir, stage, f"train.steps={STEPS}", f"train.precision={precision}",
                           "train.grad_accum_steps=2", "train.grad_clip=0.05", "train.warmup_steps=0",
                           "model.xattn.alpha_init=0.5", f"train.fused_zero_step={str(fused).lower()}")
    assert (trainer.fused_step is not None) == fused
    inf_grad_at(trainer, INF_GRAD_STEP, rank=layout.world_size - 1)
    nan_loss_at(trainer, steps=[NAN_LOSS_STEP], rank=0)
    rows = []
    for _ in range(STEPS):
        m = trainer.train_step()
        rows.append({k: m[k] for k in ("loss", "grad_norm", "step_applied", "skipped_steps", "lr")})
        rows[-1]["weights"] = snapshot(trainer.model, True)
    return rows


def _both(layout, corpus, run_dir, stage, precision="fp32"):
    """(ours, DeepSpeed's) per-step rows, the same job twice in these processes. fp32: the two paths
    differ by rounding only; a small clip so that clipping is active."""
    if precision == "bf16":  # bf16 with fp32 gradient accumulation: ZeRO's flat fp32 gradient partition
        import json
        import os

        from test_trainer import REPO

        with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json")) as f:
            stage = dict(json.load(f), data_types={"grad_accum_dtype": "fp32"})
    return (_run(layout, corpus, f"{run_dir}/ours", stage, True, precision),
            _run(layout, corpus, f"{run_dir}/deepspeed", stage, False, precision))


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the DP=2 case covers it on the CPU; "
                            "tools/gpu_check.sh runs it on the one GPU")


@pytest.mark.parametrize("stage,world,tp", [(1, 2, 1), (2, 2, 1), (2, 2, 2), (3, 2, 1),
                                            pytest.param(2, 1, 1, marks=ON_GPU)],
                         ids=["zero1-dp2", "zero2-dp2", "zero2-tp2", "zero3-dp2", "zero2-dp1"])
def test_the_fused_step_updates_as_deepspeeds_and_skips_together(stage, world, tp, synthetic_corpus, tmp_path):
    clipped = 0
    for rank, (ours, theirs) in enumerate(run_distributed(_both, world, tp, tmp_path / "out", synthetic_corpus,
                                                          str(tmp_path / "run"), stage)):
        for step, (a, b) in enumerate(zip(ours, theirs), start=1):
            skipped = step in (INF_GRAD_STEP, NAN_LOSS_STEP)
            assert a["step_applied"] == b["step_applied"] == float(not skipped), f"rank {rank} step {step}"
            assert a["skipped_steps"] == b["skipped_steps"] and a["lr"] == b["lr"]
            if step == NAN_LOSS_STEP:
                assert math.isnan(a["loss"]) and math.isnan(b["loss"])
            else:
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0), f"rank {rank} step {step}"
            if skipped:
                assert math.isnan(a["grad_norm"]) and math.isnan(b["grad_norm"])
            else:
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), f"rank {rank} step {step}"
                clipped += a["grad_norm"] > 0.05
            # weights: Adam divides by sqrt(v), so an element with a tiny gradient turns the two clip
            # coefficients' last-bit difference into ~1e-6 of its update (lr 3e-3): atol 1e-6
            for name, w in a["weights"].items():
                torch.testing.assert_close(w, b["weights"][name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, s=step, r=rank: f"rank {r} step {s} {n}: {m}")
            if skipped:  # nothing moved on any rank (steps 1 and 3 are applied, so there is a before)
                before = ours[step - 2]["weights"]
                assert all(torch.equal(w, before[n]) for n, w in a["weights"].items()), f"rank {rank} step {step}"
    assert clipped > 0, "clipping never happened: the test would not see a wrong clip coefficient"


def _count_reads(layout, corpus, run_dir, stage, accum):
    from test_zero3 import zero3_config

    from flamingo_dist.distributed.slurm import StopFlag
    from flamingo_dist.training.opcount import StepCounter

    # the loader in a worker process, as in production: the main process runs only the step. ZeRO-3
    # with every trainable partitioned (none kept whole for being small): its gathers happen too
    ds = zero3_config() if stage == 3 else stage
    trainer = make_trainer(layout, corpus, run_dir, ds, "train.steps=10", f"train.grad_accum_steps={accum}",
                           "data.num_workers=1", "checkpoint.every_minutes=60")
    trainer.stop_flag = StopFlag().install()  # the production stop-signal flag
    trainer.train_step()  # warm-up (ZeRO-3 records the order of its gathers in the first two steps)
    trainer.train_step()
    counter = StepCounter()
    with counter:
        for _ in range(3):
            trainer.train_step()
    return counter.summary(), counter.where


@pytest.mark.parametrize("stage,world", [(2, 2), (3, 2), (2, 1)], ids=["zero2-dp2", "zero3-dp2", "zero2-dp1"])
def test_one_host_read_per_optimizer_step(stage, world, synthetic_corpus, tmp_path):
    """Between logged steps a training step reads the device exactly once: the trainer's flag
    vector (norm, non-finite losses, stop signal, timed checkpoint, data error, loss sums)."""
    for summary, where in run_distributed(_count_reads, world, 1, tmp_path / "out", synthetic_corpus,
                                          str(tmp_path / "run"), stage, 2):
        assert sum(summary["host_reads"].values()) == 3, "\n".join(map(str, where))
        assert all("_read" in stack for _, _, stack in where), "\n".join(map(str, where))


def test_the_fused_step_on_the_flat_fp32_gradient_partition(synthetic_corpus, tmp_path):
    """bf16 with `data_types.grad_accum_dtype: fp32`: ZeRO-2 keeps each rank's gradients in one flat
    fp32 partition, and the norm is taken over it in one piece. bf16 rounds the weights, so the two
    paths agree to bf16's precision (BF16_EPS), not fp32's: 1.13e-3 apart at step 3 on CI's CPU."""
    for rank, (ours, theirs) in enumerate(run_distributed(_both, 2, 1, tmp_path / "out", synthetic_corpus,
                                                          str(tmp_path / "run"), 2, "bf16")):
        for step, (a, b) in enumerate(zip(ours, theirs), start=1):
            assert a["step_applied"] == b["step_applied"] == float(step not in (INF_GRAD_STEP, NAN_LOSS_STEP))
            if a["step_applied"]:
                assert a["loss"] == pytest.approx(b["loss"], rel=BF16_EPS), f"rank {rank} step {step}"
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=BF16_EPS), f"rank {rank} step {step}"
