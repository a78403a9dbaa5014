"""The training step on 1-2 gloo ranks through DeepSpeed: freezing, the optimizer's contents,
and non-finite steps skipped together on every rank."""

import os

import pytest
import torch
from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_trainer(layout, corpus, run_dir, stage, *sets):
    """A built trainer of the debug flavor; `stage`: ds_configs/zero<stage>.json, or a DeepSpeed config dict."""
    from flamingo_dist.config.load import load_config
    from flamingo_dist.training.trainer import Trainer

    cfg = load_config(None, [f"data.synthetic_dir={corpus}", f"tracking.run_dir={run_dir}", "tracking.mlflow=false",
                             f"parallel.tensor_parallel_size={layout.tp_size}", *sets])
    ds = stage if isinstance(stage, dict) else os.path.join(REPO, "ds_configs", f"zero{stage}.json")
    return Trainer(cfg, ds, layout).build(track=False)


def nan_loss_at(trainer, steps, rank: int) -> None:
    """Fault injection: from now on `rank`'s micro-batch losses are NaN at the given steps (the
    production step knows nothing of it: the trainer's forward is wrapped)."""
    forward = trainer._forward

    def faulty(batch):
        loss, stats = forward(batch)
        if trainer.state.step + 1 in steps and trainer.layout.rank == rank:
            loss = loss * float("nan")
        return loss, stats

    trainer._forward = faulty


def snapshot(model, trainable: bool):
    from flamingo_dist.training.trainer import full_param

    return {n: full_param(p).clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def _freeze_case(layout, corpus, run_dir, stage):
    # Gates open and the full rate from step 1: every trainable gets a gradient at once, and Adam's
    # first update (about lr per element) is above bf16's spacing at 1.0 (2^-7), so each one's bf16
    # copy moves in the first step. A trainable counts as optimized when some step moved it: a
    # scalar gate moved +lr then -lr is back on its bf16 value (seen), and with warm-up and closed
    # gates a LayerNorm weight's few small updates could round back to 1.0.
    trainer = make_trainer(layout, corpus, run_dir, stage, "train.steps=4", "train.weight_decay=0.0",
                           "train.warmup_steps=0", "train.lr=1e-2", "model.xattn.alpha_init=0.5")
    frozen0, train0 = snapshot(trainer.model, False), snapshot(trainer.model, True)
    moved, before = set(), train0
    for _ in range(4):
        trainer.train_step()
        now = snapshot(trainer.model, True)
        moved |= {n for n in now if not torch.equal(before[n], now[n])}
        before = now
    frozen1 = snapshot(trainer.model, False)
    opt = trainer.engine.optimizer
    groups = opt.bit16_groups if stage < 3 else opt.fp16_groups
    in_optimizer = {id(p) for g in groups for p in g}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    return {
        "frozen_changed": [n for n in frozen0 if not torch.equal(frozen0[n], frozen1[n])],
        "trainable_unchanged": [n for n in train0 if n not in moved],
        "optimizer_equals_trainable": in_optimizer == trainable,
        "n_frozen": len(frozen0), "n_trainable": len(train0),
        "frozen_dtypes": sorted({str(t.dtype) for t in frozen1.values()}),
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_weights_stay_bit_identical_and_only_trainables_are_optimized(stage, synthetic_corpus, tmp_path):
    (res,) = run_distributed(_freeze_case, 1, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"), stage)
    assert res["n_frozen"] > 40 and res["n_trainable"] > 20  # debug: 15 LM and 32 ViT tensors, 2 blocks
    assert res["frozen_changed"] == []
    assert res["trainable_unchanged"] == []
    assert res["optimizer_equals_trainable"]
    assert res["frozen_dtypes"] == ["torch.bfloat16"]  # the default precision keeps frozen weights in bf16


def _nan_case(layout, corpus, run_dir):
    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=3", "train.grad_accum_steps=2")
    nan_loss_at(trainer, steps=[2], rank=1)
    out = []
    for _ in range(3):
        before = snapshot(trainer.model, True)
        m = trainer.train_step()
        after = snapshot(trainer.model, True)
        out.append({"applied": m["step_applied"], "skipped": m["skipped_steps"],
                    "unchanged": all(torch.equal(before[n], after[n]) for n in before)})
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_nan_on_one_rank_skips_the_step_on_every_rank(tp, synthetic_corpus, tmp_path):
    results = run_distributed(_nan_case, 2, tp, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    for rank, steps in enumerate(results):
        assert [s["applied"] for s in steps] == [1.0, 0.0, 1.0], f"rank {rank}: {steps}"
        assert [s["skipped"] for s in steps] == [0.0, 1.0, 1.0], f"rank {rank}"
        assert [s["unchanged"] for s in steps] == [False, True, False], f"rank {rank}"


def _stop_case(layout, corpus, run_dir):
    from flamingo_dist.training.trainer import TrainingStopped

    trainer = make_trainer(layout, corpus, run_dir, 1, "train.steps=10", "train.max_consecutive_skipped_steps=3")
    nan_loss_at(trainer, steps=range(2, 100), rank=0)
    try:
        trainer.train()
    except TrainingStopped as e:
        return trainer.state.step, str(e)
    return trainer.state.step, None


def test_too_many_skipped_steps_stop_every_rank_with_a_message(synthetic_corpus, tmp_path):
    results = run_distributed(_stop_case, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    for step, msg in results:
        assert step == 4 and msg is not None and "max_consecutive_skipped_steps" in msg


def _text_only_on_rank1(layout, corpus, run_dir):
    from flamingo_dist.data.layout import labelled_tokens

    # gates open from the start, so the resampler gets a gradient in the first step
    trainer = make_trainer(layout, corpus, run_dir, 3, "train.steps=2", "model.xattn.alpha_init=0.5")
    draw, seen = trainer.feed.step_batches, []

    def text_only_on_rank1(n):
        out = []
        for src, batch in draw(n):
            if layout.rank == 1:  # the same text without any image: no image tokens, an empty image mask
                V = trainer.cfg.model.lm.vocab_size
                labels = batch["labels"].masked_fill(batch["labels"] >= V, 7)
                batch = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] >= V, 7),
                             labels=labels, image_attention_mask=torch.zeros_like(batch["image_attention_mask"]),
                             num_images=torch.zeros_like(batch["num_images"]),
                             media_slots=torch.zeros(1, dtype=torch.long),  # as the loader's collate gives it
                             _host=dict(batch["_host"], images=0, labelled_tokens=labelled_tokens(labels)))
            seen.append(int(batch["num_images"].sum()))
            out.append((src, batch))
        return out

    trainer.feed.step_batches = text_only_on_rank1
    before = snapshot(trainer.model, True)
    m = trainer.train_step()
    after = snapshot(trainer.model, True)
    return m["loss"], seen[0], {n: after[n] for n in after if n.startswith("resampler.")}, \
        [n for n in before if not torch.equal(before[n], after[n])]


def test_a_text_only_micro_batch_on_one_rank_trains_under_zero3(synthetic_corpus, tmp_path):
    """ZeRO-3 gathers weights inside every module call and reduces every gradient: a rank whose
    micro-batch has no image must still call the vision encoder and resampler (on one slot) and
    reach the same parameters in backward, or the ranks hang. Both step, and agree."""
    (loss0, n0, res0, moved0), (loss1, n1, res1, moved1) = run_distributed(
        _text_only_on_rank1, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    assert n0 > 0 and n1 == 0 and torch.isfinite(torch.tensor([loss0])).all() and loss0 == loss1
    assert moved0 == moved1 and any(n.startswith("resampler.") for n in moved0)
    assert res0.keys() == res1.keys() and all(torch.equal(res0[n], res1[n]) for n in res0)
