"""The training entry point on shards built by tools/build_shards.py from a folder of images with
captions (bad samples counted into MLflow), and a shard over the skip-rate limit stopping the run
with a message naming it."""

import os
import subprocess
import sys

import shardkit
from conftest import REPO


def build_pairs(tmp_path, n_images=12, per_shard=3, garbage=()):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(n_images):
        (imgs / f"{i:03d}.jpg").write_bytes(b"not an image" if i in garbage else shardkit.image_bytes(i))
        rows.append(f"{i:03d}.jpg,{shardkit.CAPTIONS[i % 4]}\n")
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(rows))
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_shards.py"), "pairs", "--images", str(imgs),
                        "--captions", str(tmp_path / "captions.csv"), "--out", str(out), "--per-shard",
                        str(per_shard)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(out)


def train(tmp_path, corpus, shards, *sets):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "flamingo_dist/train.py", "--deepspeed", "ds_configs/zero2.json",
           "--set", f"data.sources=[{{name: cc, format: pairs, shards: {shards}, val_shards: {shards}}}]",
           "--set", f"data.tokenizer={corpus}/tokenizer", "--set", f"tracking.run_dir={run_dir}",
           "--set", "train.log_every=1", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29671"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600), run_dir


def test_entry_point_trains_on_shards_built_from_an_image_folder(synthetic_corpus, tmp_path):
    import mlflow

    shards = build_pairs(tmp_path, garbage=(5,))  # one undecodable image among 12
    # the bad image's shard has 3 samples: judged when it ends, 1 of 3 is within a 0.5 skip rate
    proc, run_dir = train(tmp_path, synthetic_corpus, shards, "train.steps=3", "data.val_every_steps=3",
                          "train.micro_batch_size=2", "data.pack=false", "data.max_skip_rate=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: cc (pairs, 4 shards" in proc.stdout and "done: 3 steps" in proc.stdout, proc.stdout
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}")
    run, = client.search_runs(client.get_experiment_by_name("flamingo_dist").experiment_id)
    m = run.data.metrics
    # 3 steps x 2 sequences, one document each: 6 used; the bad image was met on the way or not yet
    assert m["data/cc/documents"] == 6
    assert m["data/cc/samples"] == 6 + m["data/cc/skipped/undecodable_image"]
    assert "val/loss/cc" in m and "loss" in m
    assert [h.step for h in client.get_metric_history(run.info.run_id, "data/cc/documents")] == [1, 2, 3]


def test_a_shard_over_the_skip_rate_stops_the_run_naming_it(synthetic_corpus, tmp_path):
    shards = build_pairs(tmp_path, n_images=12, per_shard=6, garbage=(0, 1, 2, 3))  # shard 0: 4 of 6 bad
    proc, _ = train(tmp_path, synthetic_corpus, shards, "train.steps=20", "data.max_skip_rate=0.5",
                    "data.skip_rate_min_samples=5", "tracking.mlflow=false", "data.streams=1")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pairs-00000.tar" in proc.stderr and "data.max_skip_rate = 0.5" in proc.stderr, proc.stderr[-2000:]
