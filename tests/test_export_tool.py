"""tools/export_idefics.py on a real committed checkpoint (trained with ZeRO-2 on 2 ranks, as
DP=2 and as TP=2): stock IDEFICS on the export gives the trained model's logits and greedy
tokens; --plain writes every weight."""

import os
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed
from test_export_idefics import inputs
from test_trainer import make_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(layout, corpus, run_dir):
    trainer = make_trainer(layout, corpus, run_dir, 2, "train.steps=3", "train.precision=fp32",
                           "model.xattn.qk_layer_norms=true", "model.xattn.alpha_type=vector", "train.lr=0.05")
    trainer.train()  # saves a checkpoint at the end
    with torch.no_grad():
        logits = trainer.model.logits(*inputs(512))
    names = sorted(trainer.model.state_dict())
    return logits, os.path.join(run_dir, "checkpoints", "step_00000003"), names


def export(*args):
    proc = subprocess.run([sys.executable, "tools/export_idefics.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("tp", [1, 2], ids=["zero2-dp2", "tp2"])
def test_exported_checkpoint_gives_the_trained_logits(tp, synthetic_corpus, tmp_path):
    from safetensors import safe_open
    from transformers import IdeficsForVisionText2Text, IdeficsProcessor

    (logits, ckpt, names), _ = run_distributed(_train, 2, tp, tmp_path / "out", synthetic_corpus,
                                               str(tmp_path / "run"))
    out = str(tmp_path / "hf")
    export("--checkpoint", ckpt, "--out", out)
    hf = IdeficsForVisionText2Text.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(*[], **dict(zip(("input_ids", "pixel_values", "image_attention_mask"), inputs(512)))).logits
    rel = (logits - theirs).abs().max() / theirs.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    assert hf.model.gated_cross_attn_layers[0].alpha_dense.abs().max() > 0  # trained gates, not the init
    processor = IdeficsProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 513 and processor.image_processor.image_size == 32
    # the exported processor reproduces our pipeline's ids, image mask and pixels
    import numpy as np
    from PIL import Image

    from flamingo_dist.data.layout import document_text, image_attention_mask
    from flamingo_dist.data.processing import image_transform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (57, 83, 3), dtype=np.uint8)) for _ in range(2)]
    prompt = ["look at the image .", images[0], "a small red circle .", images[1], "a large blue square ."]
    ref = processor(text=[prompt], add_eos_token=True, return_tensors="pt")
    tok = processor.tokenizer
    text, _ = document_text(prompt, tok.bos_token, tok.eos_token)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(image_attention_mask(ids, 513, tok.eos_token_id, 2), ref["image_attention_mask"].long())
    ours = torch.stack([image_transform(32)(im) for im in images])
    torch.testing.assert_close(ours, ref["pixel_values"][0], rtol=0, atol=1e-6)
    plain = str(tmp_path / "plain.safetensors")
    export("--checkpoint", ckpt, "--out", plain, "--plain")
    with safe_open(plain, "pt") as f:
        assert sorted(f.keys()) == names


def test_evaluating_the_export_and_its_checkpoint_gives_identical_scores(synthetic_corpus, tmp_path):
    import json

    (_, ckpt, _), _ = run_distributed(_train, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    hf_dir = str(tmp_path / "hf")
    export("--checkpoint", ckpt, "--out", hf_dir)
    common = ["--synthetic", str(tmp_path / "tasks"), "--shots", "0", "4", "--methods", "random", "rices",
              "--max-queries", "4", "--max-new-tokens", "5"]
    results = {}
    for name, source in (("ours", ["--checkpoint", ckpt]), ("hf", ["--hf", hf_dir])):
        out = str(tmp_path / f"{name}.json")
        proc = subprocess.run([sys.executable, "tools/evaluate.py", *source, *common, "--out", out], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out) as f:
            results[name] = json.load(f)
    ours, theirs = results["ours"]["tasks"], results["hf"]["tasks"]
    for task in ours:
        for cfg, r in ours[task].items():
            assert r["trials"] == theirs[task][cfg]["trials"], (task, cfg)  # identical scores
            for mine, hf in zip(r["predictions"], theirs[task][cfg]["predictions"]):
                if task == "synthetic_memes":  # P(yes): the same up to float rounding of the logits
                    assert mine == pytest.approx(hf, rel=1e-4, abs=1e-6), (task, cfg)
                else:  # generated text: identical
                    assert mine == hf, (task, cfg)
    assert set(ours) == {"synthetic_captions", "synthetic_vqa_color", "synthetic_vqa_shape", "synthetic_memes",
                         "synthetic_shapes"}
    # the comparison is not vacuous: the model generates text, and its scores depend on the input
    # (P(yes) differs for every meme; memes' scores are compared to 1e-4 above). Distinct captions
    # are not asked of a model trained 3 steps: on a clean clone's own backbone build (CPU builds
    # are not bit-reproducible between checkouts here) every caption was "square".
    captions = [t for r in ours["synthetic_captions"].values() for p in r["predictions"] for t in p.values()]
    assert any(captions)
    p_yes = list(ours["synthetic_memes"]["4shot_random"]["predictions"][0].values())
    assert len(set(p_yes)) == len(p_yes) == 4
    assert results["ours"]["protocol_version"] == results["hf"]["protocol_version"]
