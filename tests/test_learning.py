"""A small Flamingo learns to read its images: trained on the synthetic corpus on top of the
pretrained synthetic backbones (built once into data/backbones and shared with `make demo`), it
predicts the held-out documents' colour, shape and size words far better with their true images
than with images shuffled across documents, where it is near chance.

This guards the whole training path at once (image attention mask, labels, gates, resampler,
data layout, optimizer groups): a bug in any of them leaves the model blind. Mutations run once
against this test (2026-12-02; docs/learning.md):
- every training row given the next row's images (the pipeline pairs text with the wrong
  images): true-image accuracy 0.11 / 0.36 / 0.52, the test fails;
- the image attention mask off by one image (each token sees the image after its own, the bug of
  a cumulative count that forgets its -1): 0.15 / 0.36 / 0.79, the test fails;
- the mask one token later along the sequence: 1.00 / 0.96 / 1.00, the test passes, and must: in
  the IDEFICS layout `<image>` and `<fake_token_around_image>` separate an image from its text and
  neither is a target, so a one-token shift changes no predicted token's image. The mask's exact
  equality with IdeficsProcessor's is tested in tests/test_data.py.
"""

import os

from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 500


def _learn(layout, corpus_dir, run_dir, *sets):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.training.trainer import Trainer

    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"), [
        f"data.synthetic_dir={corpus_dir}", "data.synthetic_num_docs=4096", "data.synthetic_val_docs=192",
        "data.val_batches=12", f"data.val_every_steps={STEPS}", f"train.steps={STEPS}", "eval.every_steps=0",
        "eval.at_start=false", f"tracking.run_dir={run_dir}", "tracking.mlflow=false", "checkpoint.at_end=false",
        f"parallel.tensor_parallel_size={layout.tp_size}", *sets])
    trainer = Trainer(cfg, os.path.join(REPO, "ds_configs", "zero2.json"), layout).build(track=False)
    trainer.train()
    return trainer.validate()


def test_the_model_reads_its_images(tmp_path):
    (val,) = run_distributed(_learn, 1, 1, tmp_path / "out", str(tmp_path / "corpus"), str(tmp_path / "run"))
    chance = {"color": 1 / 8, "shape": 1 / 3, "size": 1 / 2}
    for group in ("color", "shape", "size"):
        true, shuffled = val[f"val/accuracy/true_images/{group}"], val[f"val/accuracy/shuffled_images/{group}"]
        assert true >= 0.8, (group, val)
        assert shuffled <= chance[group] + 0.12, (group, val)  # near chance without the right image
        assert true - shuffled >= 0.3, (group, val)
