"""A mixture of sources: every optimizer step holds micro-batches of every source, and the logged
loss is sum_s weight_s * L_s (L_s the source's mean token loss over the global batch), the same
for DP=1 with accumulation and DP=2 without, on the same global batch."""

import pytest
import shardkit
from distributed import run_distributed
from test_trainer import make_trainer

WEIGHTS = {"docs": 1.0, "pairs": 0.2}


@pytest.fixture(scope="module")
def pairs_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    for s in range(4):
        shardkit.write_tar(str(out / f"pairs-{s:05d}.tar"),
                           [{"__key__": f"p{s}_{i}", "jpg": shardkit.image_bytes(10 * s + i),
                             "txt": shardkit.CAPTIONS[(s + i) % 4], "json": "{}"} for i in range(6)])
    return str(out)


def sources_setting(corpus, pairs):
    return ("data.sources=[{name: docs, format: obelics, shards: %s, weight: 1.0}, "
            "{name: pairs, format: pairs, shards: %s, weight: 0.2, micro_batch_size: 3}]" % (corpus, pairs))


def _one_step(layout, corpus, pairs, run_dir, accum):
    from flamingo_dist.data.layout import labelled_tokens

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=2", "train.precision=fp32", "data.streams=2",
                           f"train.grad_accum_steps={accum}", f"data.tokenizer={corpus}/tokenizer",
                           sources_setting(corpus, pairs))
    seen = []
    draw, forward = trainer.feed.step_batches, trainer._forward

    def spy_draw(n):
        out = draw(n)
        seen.extend([src.name, len(b["input_ids"]), labelled_tokens(b["labels"])] for src, b in out)
        return out

    losses = []

    def spy_forward(batch):
        loss, stats = forward(batch)
        losses.append(loss.item())
        return loss, stats

    trainer.feed.step_batches, trainer._forward = spy_draw, spy_forward
    metrics = trainer.train_step()
    return metrics, [s + [loss] for s, loss in zip(seen, losses)]


def expected_loss(records) -> tuple[float, dict]:
    sums = {}
    for name, _, tokens, loss in records:
        lt, t = sums.get(name, (0.0, 0))
        sums[name] = (lt + loss * tokens, t + tokens)
    per = {n: lt / t for n, (lt, t) in sums.items()}
    return sum(WEIGHTS[n] * v for n, v in per.items()), per


def test_weighted_loss_is_the_same_for_dp1_with_accumulation_and_dp2(synthetic_corpus, pairs_shards, tmp_path):
    (m1, rec1), = run_distributed(_one_step, 1, 1, tmp_path / "a", synthetic_corpus, pairs_shards,
                                  str(tmp_path / "r1"), 2)
    ranks = run_distributed(_one_step, 2, 1, tmp_path / "b", synthetic_corpus, pairs_shards, str(tmp_path / "r2"), 1)
    # every step holds a micro-batch of each source (with its own micro-batch size)
    assert [(n, b) for n, b, _, _ in rec1] == [("docs", 4), ("pairs", 3), ("docs", 4), ("pairs", 3)]
    assert all([(n, b) for n, b, _, _ in r[1]] == [("docs", 4), ("pairs", 3)] for r in ranks)
    # DP=2 rank r holds what DP=1 drew as its r-th micro-batch of each source: the same global batch
    assert [r[2] for r in rec1] == [x[2] for r in ranks for x in r[1]]
    want1, per1 = expected_loss(rec1)
    want2, per2 = expected_loss([x for r in ranks for x in r[1]])
    assert m1["loss"] == pytest.approx(want1, rel=1e-9)
    assert m1["loss/docs"] == pytest.approx(per1["docs"], rel=1e-9)
    assert m1["loss/pairs"] == pytest.approx(per1["pairs"], rel=1e-9)
    assert ranks[0][0]["loss"] == pytest.approx(want2, rel=1e-9)
    assert ranks[0][0]["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert ranks[0][0]["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
    assert abs(per1["docs"] - per1["pairs"]) > 1e-3  # the weights matter: not an unweighted mean in disguise
    assert m1["loss"] != pytest.approx((per1["docs"] + per1["pairs"]) / 2, rel=1e-3)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("video")
    for s in range(2):
        shardkit.write_tar(str(out / f"video-{s:05d}.tar"), [
            {"__key__": f"v{s}_{i}", "txt": shardkit.CAPTIONS[i % 4],
             **{f"frame{k:03d}.jpg": shardkit.image_bytes(100 * s + 10 * i + k) for k in range(3 + i % 2)}}
            for i in range(4)])
    return str(out)


def _video_step(layout, corpus, video, run_dir):
    import torch

    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=2", "train.precision=fp32",
                           f"data.tokenizer={corpus}/tokenizer", "model.resampler.max_frames=4",
                           "data.frames_per_video=4",
                           "data.sources=[{name: docs, format: obelics, shards: %s}, "
                           "{name: clips, format: video, shards: %s, weight: 0.03, micro_batch_size: 2}]"
                           % (corpus, video))
    shapes = []
    draw = trainer.feed.step_batches

    def spy(n):
        out = draw(n)
        shapes.extend((src.name, tuple(b["pixel_values"].shape)) for src, b in out)
        return out

    trainer.feed.step_batches = spy
    m = trainer.train_step()  # the gates start at 0: this step opens them, the next one reaches the resampler
    before = trainer.model.resampler.frame_embs.detach().clone()
    trainer.train_step()
    moved = not torch.equal(before, trainer.model.resampler.frame_embs.detach())
    return m, shapes[:2], moved


def test_a_video_source_trains_with_per_frame_time_embeddings(synthetic_corpus, video_shards, tmp_path):
    (m, shapes, moved), = run_distributed(_video_step, 1, 1, tmp_path / "o", synthetic_corpus, video_shards,
                                          str(tmp_path / "run"))
    assert shapes == [("docs", (4, 3, 3, 32, 32)), ("clips", (2, 3, 4, 3, 32, 32))]  # [B, media, frames, C, H, W]
    assert m["loss/clips"] == m["loss/clips"] and m["loss/clips"] > 0
    assert moved  # the time embeddings got a gradient and an update
