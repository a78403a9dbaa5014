"""Committed checkpoints: bit-identical resume in fresh processes (ZeRO-2 DP=2, TP=2), a crash
before the commit, a damaged file, pruning."""

import glob
import os

import pytest
import torch
from distributed import capture_logs, run_distributed
from test_trainer import make_trainer, snapshot


def _train(layout, corpus, run_dir, steps, stop_after, resume):
    """Train a job of `steps` steps; stop (saving a checkpoint) after `stop_after` of them."""
    sets = [f"train.steps={steps}", f"tracking.run_dir={run_dir}"]
    if resume:
        sets.append("checkpoint.resume=auto")
    trainer = make_trainer(layout, corpus, run_dir, 2, *sets)
    rows = []
    while trainer.state.step < stop_after:
        m = trainer.train_step()
        rows.append((trainer.state.step, m["loss"], m["lr"], m["grad_norm"]))
    if stop_after < steps:
        trainer.save_checkpoint()
    return rows, snapshot(trainer.model, True)


@pytest.mark.parametrize("tp", [1, 2], ids=["zero2-dp2", "tp2"])
def test_resume_is_bit_identical(tp, synthetic_corpus, tmp_path):
    straight = run_distributed(_train, 2, tp, tmp_path / "a", synthetic_corpus, str(tmp_path / "ra"), 8, 8, False)
    first = run_distributed(_train, 2, tp, tmp_path / "b1", synthetic_corpus, str(tmp_path / "rb"), 8, 4, False)
    second = run_distributed(_train, 2, tp, tmp_path / "b2", synthetic_corpus, str(tmp_path / "rb"), 8, 8, True)
    for rank in range(2):
        rows_a, weights_a = straight[rank]
        rows_b = first[rank][0] + second[rank][0]
        assert [r[0] for r in rows_b] == list(range(1, 9))
        assert rows_b == rows_a, f"rank {rank}: per-step (step, loss, lr, grad_norm) differ"
        weights_b = second[rank][1]
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _crash_and_damage(layout, corpus, run_dir):
    from flamingo_dist.training import checkpoint

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=6", "checkpoint.keep_last=0")
    root = os.path.join(run_dir, "checkpoints")
    trainer.train_step()
    trainer.train_step()
    good = trainer.save_checkpoint()
    trainer.train_step()
    trainer.train_step()
    late = trainer.save_checkpoint()
    logs = []
    capture_logs("flamingo_dist.training.checkpoint", logs)
    out = {}
    torch.distributed.barrier()
    if layout.rank == 0:  # a crash between the shard writes and the commit marker
        os.rename(os.path.join(late, checkpoint.COMMIT), os.path.join(late, "COMMIT.bak"))
    torch.distributed.barrier()
    out["auto_after_crash"] = checkpoint.resolve_resume("auto", root)
    torch.distributed.barrier()
    if layout.rank == 0:  # committed, then a flipped byte in a shard
        os.rename(os.path.join(late, "COMMIT.bak"), os.path.join(late, checkpoint.COMMIT))
        shard = sorted(glob.glob(os.path.join(late, "ds", "*optim_states.pt")))[0]
        with open(shard, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
        out["damaged"] = shard
    torch.distributed.barrier()
    try:
        checkpoint.resolve_resume(late, root)
        out["explicit_error"] = None
    except checkpoint.CheckpointError as e:
        out["explicit_error"] = str(e)
    out["auto_after_damage"] = checkpoint.resolve_resume("auto", root)
    out["good"], out["late"], out["logs"] = good, late, logs
    return out


def test_crash_before_commit_and_damaged_file(synthetic_corpus, tmp_path):
    res = run_distributed(_crash_and_damage, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    r0 = res[0]
    for r in res:
        assert r["auto_after_crash"] == r0["good"]  # the uncommitted one does not count
        assert r["auto_after_damage"] == r0["good"]  # auto falls back ...
        assert any("skipping damaged checkpoint" in line for line in r["logs"])  # ... and says so
        assert r["explicit_error"] is not None and os.path.basename(r0["damaged"]) in r["explicit_error"]
        assert "SHA-256 mismatch" in r["explicit_error"]


def _prune(layout, corpus, run_dir):
    trainer = make_trainer(layout, corpus, run_dir, 1, "train.steps=5", "checkpoint.every_steps=1",
                           "checkpoint.keep_last=2", "checkpoint.keep_every=2", "checkpoint.at_end=false")
    trainer.train()
    import time

    from flamingo_dist.training import checkpoint

    time.sleep(1.0)  # deletion runs in a background thread
    return [os.path.basename(p) for p in checkpoint.committed(os.path.join(run_dir, "checkpoints"))]


def test_keep_last_and_keep_every(synthetic_corpus, tmp_path):
    (kept,) = run_distributed(_prune, 1, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    assert kept == ["step_00000002", "step_00000004", "step_00000005"]


def _full_state(trainer) -> dict:
    """Every trainable tensor's fp32 master, exp_avg and exp_avg_sq, whole (ZeRO partitions and TP
    shards gathered), plus the optimizer's step count and the learning rate. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from flamingo_dist.distributed.groups import tp_group

    def whole(p, t):
        if not getattr(p, "tensor_model_parallel", False) or trainer.layout.tp_size == 1:
            return t.detach().clone()
        parts = [torch.empty_like(t) for _ in range(trainer.layout.tp_size)]
        torch.distributed.all_gather(parts, t.contiguous(), group=tp_group())
        return torch.cat(parts, dim=p.partition_dim)

    opt = trainer.engine.optimizer
    if trainer.state.step > 0 and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8 links the per-parameter views of the moments after the first param
        # group's first step, before the other groups have moments: link again to read them all
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            out[name] = {"fp32": whole(p, safe_get_full_fp32_param(p)),
                         "exp_avg": whole(p, safe_get_full_optimizer_state(p, "exp_avg")),
                         "exp_avg_sq": whole(p, safe_get_full_optimizer_state(p, "exp_avg_sq"))}
    return {"params": out, "lr": trainer.engine.get_lr()[0], "step": trainer.state.step,
            "slots": trainer.feed.slots()}


def _reshard(layout, corpus, run_dir, stage, resume, *sets):
    """Save after 2 steps, then one more step; or resume and take that step in this layout."""
    # 2 data streams: the data of dp 2 and of dp 1 (x 1 loader) continue exactly at the other layout
    trainer = make_trainer(layout, corpus, run_dir, stage, "train.steps=4", "train.precision=fp32", "data.streams=2",
                           *sets,
                           *(["checkpoint.resume=auto"] if resume else []))
    if not resume:
        trainer.train_step()
        trainer.train_step()
        trainer.save_checkpoint()
    state = _full_state(trainer)
    m = trainer.train_step()
    return state, m["loss"], m["grad_norm"]


# ZeRO stage, (world, tp, settings) before -> after; the global batch stays 8 documents (micro-batch 4)
RESHARD = {
    "zero2-dp2-to-dp1": (2, (2, 1, []), (1, 1, ["train.grad_accum_steps=2"])),
    "zero2-dp1-to-dp2": (2, (1, 1, ["train.grad_accum_steps=2"]), (2, 1, [])),
    "zero2-tp2-to-tp1": (2, (2, 2, ["train.grad_accum_steps=2"]), (1, 1, ["train.grad_accum_steps=2"])),
    "zero1-dp2-to-dp1": (1, (2, 1, []), (1, 1, ["train.grad_accum_steps=2"])),
    "zero3-dp2-to-dp1": (3, (2, 1, []), (1, 1, ["train.grad_accum_steps=2"])),
    "zero2-tp1-to-tp2": (2, (1, 1, ["train.grad_accum_steps=2"]), (2, 2, ["train.grad_accum_steps=2"])),
}


@pytest.mark.parametrize("case", RESHARD)
def test_resume_at_another_layout_restores_weights_and_moments(case, synthetic_corpus, tmp_path):
    stage, (w0, tp0, sets0), (w1, tp1, sets1) = RESHARD[case]
    run = str(tmp_path / "run")
    before = run_distributed(_reshard, w0, tp0, tmp_path / "a", synthetic_corpus, run, stage, False, *sets0)
    after = run_distributed(_reshard, w1, tp1, tmp_path / "b", synthetic_corpus, run, stage, True, *sets1)
    saved, loaded = before[0][0], after[0][0]
    assert loaded["step"] == saved["step"] == 2 and loaded["lr"] == saved["lr"]
    assert loaded["slots"] == saved["slots"] == 4  # 2 steps x 2 micro-batches
    assert saved["params"].keys() == loaded["params"].keys()
    for name, tensors in saved["params"].items():
        for kind, t in tensors.items():
            assert torch.equal(t, loaded["params"][name][kind]), f"{name} {kind} differs after resharding"
    # the next step sees the same documents with the same state: the same loss up to reduction order
    assert after[0][1] == pytest.approx(before[0][1], rel=1e-5)
    assert after[0][2] == pytest.approx(before[0][2], rel=1e-4)


def _train_seeded(layout, corpus, run_dir, seed, resume):
    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=4", f"train.seed={seed}",
                           "model.synthetic_backbones=null",  # a random LM: the seed makes the base
                           *(["checkpoint.resume=auto"] if resume else []))
    if not resume:
        trainer.train_step()
        trainer.save_checkpoint()


def test_resume_against_another_base_model_is_refused(synthetic_corpus, tmp_path):
    run_distributed(_train_seeded, 1, 1, tmp_path / "a", synthetic_corpus, str(tmp_path / "r"), 1, False)
    with pytest.raises(Exception, match="frozen base model differs.*random_seed"):
        run_distributed(_train_seeded, 1, 1, tmp_path / "b", synthetic_corpus, str(tmp_path / "r"), 2, True)


def test_base_model_hashes_are_cached_and_changes_are_named(tmp_path):
    from flamingo_dist.training import checkpoint

    base = tmp_path / "llama"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"\x00" * 1000)
    first = checkpoint._hash_dir_cached(str(base))
    assert set(first) == {"config.json", "model.safetensors"}
    assert (base / ".flamingo_dist_sha256.json").is_file()
    assert checkpoint._hash_dir_cached(str(base)) == first
    (base / "model.safetensors").write_bytes(b"\x01" * 1000)
    saved = {"base": {"path": str(base), "files": first}}
    now = {"base": {"path": str(base), "files": checkpoint._hash_dir_cached(str(base))}}
    problems = checkpoint._manifest_mismatch(saved, now)
    assert len(problems) == 1 and "model.safetensors" in problems[0]
