"""The demo's parts: the synthetic backbones (what they load as, what they learned, how a config
finds them), the held-out attribute accuracy (shuffling, hiding, counting) and the learning
report with its checks."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def test_backbones_are_hugging_face_and_open_clip_weights_that_learned_their_job(synthetic_backbones):
    import open_clip
    from transformers import AutoTokenizer, LlamaForCausalLM

    from flamingo_dist.demo.backbones import MIN_ACCURACY, lm_path, read_done, vit_path
    from flamingo_dist.models.vision import register_model_config

    done = read_done(synthetic_backbones)
    assert min(done["lm"]["copy_accuracy"].values()) >= MIN_ACCURACY and done["lm"]["binding_accuracy"] >= MIN_ACCURACY
    assert min(done["vit"]["zero_shot_accuracy"].values()) >= MIN_ACCURACY
    lm = LlamaForCausalLM.from_pretrained(lm_path(synthetic_backbones)).eval()
    tok = AutoTokenizer.from_pretrained(lm_path(synthetic_backbones))
    # the LM reads an attribute from the image's words on the tokens after the image ...
    from flamingo_dist.demo.backbones import embed

    ids = tok("<s>img Question:what color is the shape ? Short answer:", add_special_tokens=False,
              return_tensors="pt").input_ids
    on = torch.tensor(tok.convert_tokens_to_ids(["blue", "triangle", "small"])).expand(1, ids.shape[1], 3).clone()
    on[0, 0] = 0
    with torch.no_grad():
        assert tok.convert_ids_to_tokens(int(lm(inputs_embeds=embed(lm, ids, on)).logits[0, -1].argmax())) == "blue"
        # ... and names an image by the label an earlier image of its shape had in this text
        ids = tok("<s>img dax img wug img fep img", add_special_tokens=False, return_tensors="pt").input_ids
        shapes = ["circle", "square", "triangle", "square"]
        on = torch.zeros(1, ids.shape[1], 3, dtype=torch.long)
        for k, t in enumerate(range(1, ids.shape[1], 2)):
            on[0, t:t + 2] = torch.tensor(tok.convert_tokens_to_ids(["red", shapes[k], "large"]))
        assert tok.convert_ids_to_tokens(int(lm(inputs_embeds=embed(lm, ids, on)).logits[0, -1].argmax())) == "wug"
    register_model_config(done["recipe"]["vision_model"])
    clip = open_clip.create_model(done["recipe"]["vision_model"], pretrained=vit_path(synthetic_backbones))
    assert clip.visual.image_size[0] == done["recipe"]["image_size"]


def test_a_config_points_at_the_backbones_or_says_why_not(synthetic_backbones, tmp_path):
    from flamingo_dist.config.load import config_from_dict, load_config
    from flamingo_dist.config.schema import ConfigError
    from flamingo_dist.training.build import resolve_model_config

    cfg = load_config(None, [f"model.synthetic_backbones={synthetic_backbones}"])
    resolve_model_config(cfg.model)
    assert cfg.model.lm.path == os.path.join(synthetic_backbones, "lm")
    assert cfg.model.vision.pretrained == os.path.join(synthetic_backbones, "vit.pt")
    assert cfg.model.synthetic_backbones is None  # a checkpoint's config names the weights it used

    other = load_config(None, [f"model.synthetic_backbones={synthetic_backbones}", "model.lm.num_kv_heads=4"])
    with pytest.raises(ConfigError, match="another recipe.*lm"):
        resolve_model_config(other.model)
    missing = load_config(None, [f"model.synthetic_backbones={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="holds no built backbones.*tools/build_backbones.py"):
        resolve_model_config(missing.model)
    with pytest.raises(ConfigError, match="model.synthetic_backbones.*excludes model.lm.path"):
        load_config(None, [f"model.lm.path={tmp_path}"])
    # a checkpoint's config from before the field existed keeps its own random LM
    old = {k: v for k, v in json.loads(json.dumps(__import__("dataclasses").asdict(load_config()))).items()}
    del old["model"]["synthetic_backbones"]
    assert config_from_dict(old).model.synthetic_backbones is None


def test_a_half_built_directory_is_not_taken_for_backbones(tmp_path):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.config.schema import ConfigError
    from flamingo_dist.demo.backbones import ensure_backbones

    (tmp_path / "bb").mkdir()
    cfg = load_config()
    with pytest.raises(ConfigError, match="no complete build"):
        ensure_backbones(str(tmp_path / "bb"), cfg.model.lm, cfg.model.vision.model_name, 32)


def test_builds_left_by_ended_processes_are_removed_and_others_kept(tmp_path):
    """A build killed mid-way leaves `<root>.building-<host>-<pid>`; the next build removes those of
    this host whose process has ended, and keeps running ones and other hosts' (shared storage)."""
    import socket

    from flamingo_dist.demo.backbones import remove_abandoned_builds

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    root = str(tmp_path / "bb")
    host = socket.gethostname()
    dead = tmp_path / f"bb.building-{host}-{ended.pid}"
    alive = tmp_path / f"bb.building-{host}-{os.getppid()}"  # the process that started pytest
    other_host = tmp_path / f"bb.building-{host}x-{ended.pid}"
    for d in (dead, alive, other_host):
        (d / "lm").mkdir(parents=True)
    assert remove_abandoned_builds(root) == [str(dead)]
    assert not dead.exists() and alive.exists() and other_host.exists()
    assert remove_abandoned_builds(root) == []


def test_lm_documents_carry_each_image_on_the_tokens_after_it_and_mark_what_it_determines(synthetic_corpus):
    from transformers import AutoTokenizer

    from flamingo_dist.data.synthetic import ATTRIBUTES
    from flamingo_dist.demo.backbones import BOUND, IMAGE_WORD, lm_document

    tok = AutoTokenizer.from_pretrained(os.path.join(synthetic_corpus, "tokenizer"))
    rng = random.Random(3)
    for _ in range(20):
        ids, on, marks = lm_document(tok, rng, 3)
        words = tok.convert_ids_to_tokens(ids)
        carried = [tok.convert_ids_to_tokens(o) if o[0] else None for o in on]
        assert words[0] == "<s>" and carried[0] is None and IMAGE_WORD in words
        for t, w in enumerate(words):
            if w == IMAGE_WORD:  # the image and every token up to the next image carry its words
                nxt = words.index(IMAGE_WORD, t + 1) if IMAGE_WORD in words[t + 1:] else len(words) - 1
                assert all(carried[u] == carried[t] for u in range(t, nxt)) and carried[t] is not None
        marked = [(w, g) for w, g in zip(words, marks) if g >= 0]
        assert marked and all(g < BOUND for _, g in marked)
        for t, g in enumerate(marks):  # a marked word is the one its image carries in that group
            if g >= 0:
                assert words[t] in ATTRIBUTES[list(ATTRIBUTES)[g]] and words[t] == carried[t][g], (words, carried)
        no_images, no_on, _ = lm_document(tok, random.Random(3), 3, describe=False)
        assert IMAGE_WORD not in tok.convert_ids_to_tokens(no_images) and not any(o[0] for o in no_on)


def test_binding_documents_mark_the_labels_an_earlier_image_of_the_same_shape_bound(synthetic_corpus):
    from transformers import AutoTokenizer

    from flamingo_dist.data.synthetic import ATTRIBUTES, BINDING_LABELS
    from flamingo_dist.demo.backbones import BOUND, lm_document

    tok = AutoTokenizer.from_pretrained(os.path.join(synthetic_corpus, "tokenizer"))
    rng = random.Random(4)
    for _ in range(20):
        ids, on, marks = lm_document(tok, rng, 8, kind="binding")
        words = tok.convert_ids_to_tokens(ids)
        shapes = [tok.convert_ids_to_tokens(o)[list(ATTRIBUTES).index("shape")] if o[0] else None for o in on]
        seen = {}
        for t, w in enumerate(words):
            if w in BINDING_LABELS:
                assert (marks[t] == BOUND) == (shapes[t] in seen)  # determined iff its shape was named before
                assert seen.setdefault(shapes[t], w) == w  # one label per shape in a document


def test_the_lm_keeps_reading_several_images_while_it_learns_the_binding():
    """The LM's pretraining schedule: after LM_STEPS every three batches hold one binding batch,
    one of one-image and one of several-image documents (replacing the several-image batches by
    binding episodes cost the colour reading, 0.85 on CI's CPU)."""
    from flamingo_dist.demo.backbones import BINDING_IMAGES, BINDING_STEPS, LM_STEPS, MAX_IMAGES, lm_batch_kind

    first = [lm_batch_kind(s) for s in range(LM_STEPS)]
    assert set(first) == {("attributes", 1), ("attributes", MAX_IMAGES)}
    assert first.count(("attributes", 1)) == first.count(("attributes", MAX_IMAGES))
    then = [lm_batch_kind(s) for s in range(LM_STEPS, LM_STEPS + BINDING_STEPS)]
    for w in range(0, len(then) - 2, 3):
        assert set(then[w:w + 3]) == {("attributes", 1), ("attributes", MAX_IMAGES), ("binding", BINDING_IMAGES)}


def _batches():
    """Two batches of 2 rows; image k of the set is a constant image of value k (row 1 of the
    second batch has none); labels hold colour word ids 10 + k after image k."""
    out, k = [], 0
    for counts in ((2, 1), (3, 0)):
        pv = torch.zeros(2, 3, 3, 2, 2, dtype=torch.uint8)
        labels = torch.full((2, 8), -100)
        mask = torch.zeros(2, 8, 3, dtype=torch.long)
        for r, n in enumerate(counts):
            for j in range(n):
                pv[r, j] = k
                labels[r, 2 + 2 * j] = 10 + k % 3
                mask[r, 1 + 2 * j: 3 + 2 * j, j] = 1
                k += 1
        out.append({"pixel_values": pv, "labels": labels, "image_attention_mask": mask,
                    "num_images": torch.tensor(counts), "input_ids": torch.zeros(2, 8, dtype=torch.long)})
    return out


def test_shuffled_images_always_come_from_another_row_and_hidden_ones_are_masked():
    from flamingo_dist.eval.attributes import hide_images, shuffle_images

    batches = _batches()  # rows with images: (0,0) images 0,1; (0,1) image 2; (1,0) images 3,4,5
    for offset in (1, 2):
        shuffled = shuffle_images(batches, offset)
        own = {(0, 0): {0, 1}, (0, 1): {2}, (1, 0): {3, 4, 5}}
        for (b, r), mine in own.items():
            got = {int(shuffled[b]["pixel_values"][r, j].max()) for j in range(int(batches[b]["num_images"][r]))}
            assert got and not (got & mine), (offset, b, r, got)
        assert torch.equal(shuffled[1]["pixel_values"][1], batches[1]["pixel_values"][1])  # no images: untouched
    with pytest.raises(ValueError, match="its own images"):
        shuffle_images(batches, 3)
    assert all(int(b["image_attention_mask"].sum()) == 0 for b in hide_images(batches))


def test_attribute_accuracy_counts_only_the_group_words_under_each_condition():
    from flamingo_dist.eval.attributes import attribute_accuracy

    batches = _batches()

    def reads_images(batch):  # predicts colour 10 + (image value % 3) where a token sees an image
        logits = torch.zeros(2, 8, 20)
        value = (batch["image_attention_mask"].float() * batch["pixel_values"].amax(dim=(2, 3, 4))[:, None]).sum(-1)
        seen = batch["image_attention_mask"].sum(-1) > 0
        logits[..., 0] = 0.5  # an unseen image: predict word 0
        idx = (10 + value.long() % 3).clamp(max=19)
        logits.scatter_(-1, idx[..., None], seen[..., None].float())
        return logits

    calls = []
    acc = attribute_accuracy(lambda b: calls.append(1) or reads_images(b), batches, {"color": [10, 11, 12]})
    assert acc["true/color"] == 1.0 and acc["no/color"] == 0.0 and acc["count/color"] == 6
    # images 0..5 carry words 10,11,12,10,11,12; rotations by 1 and 2 rows match 2 and 3 of 6
    # (a rotation by 3 gives the three rows their own images: run, for symmetric collectives, not counted)
    assert acc["shuffled/color"] == pytest.approx(5 / 12)
    assert acc["majority/color"] == pytest.approx(2 / 6)
    assert len(calls) == (2 + 3) * len(batches)
    one_row = [dict(batches[0], num_images=torch.tensor([1, 0]))]  # nothing to shuffle with
    acc = attribute_accuracy(reads_images, one_row, {"color": [10, 11, 12]})
    assert acc["true/color"] == 1.0 and acc["shuffled/color"] != acc["shuffled/color"]  # NaN: unknown


def _write_run(run_dir, shuffled_size=0.5, shapes_4shot=95.0):
    os.makedirs(os.path.join(run_dir, "eval"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in (0, 10):
            f.write(json.dumps({"step": step, "loss": 1.0 - step / 20, "gate/cross_attn/layer0": -0.2}) + "\n")
            val = {"step": step, "val/loss": 0.9 - step / 20}
            for g, chance in (("color", 1 / 8), ("shape", 1 / 3), ("size", 1 / 2)):
                val.update({f"val/accuracy/true_images/{g}": 0.5 + step / 20, f"val/accuracy/no_images/{g}": chance,
                            f"val/accuracy/shuffled_images/{g}": shuffled_size if g == "size" else chance,
                            f"val/accuracy/majority/{g}": chance})
            f.write(json.dumps(val) + "\n")
    with open(os.path.join(run_dir, "eval", "step_00000010.json"), "w") as f:
        json.dump({"step": 10, "tasks": {"synthetic_shapes": {"4shot_random": {"mean": shapes_4shot}},
                                         "synthetic_vqa_color": {"4shot_random": {"mean": 100.0}}}}, f)


def test_report_writes_numbers_picture_and_checks(tmp_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    _write_run(good)
    _write_run(bad, shuffled_size=0.7, shapes_4shot=80.0)
    tool = [sys.executable, os.path.join(REPO, "tools", "demo_report.py")]
    proc = subprocess.run([*tool, good, "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.load(open(os.path.join(good, "learning.json")))
    assert summary["passed"] and summary["held_out_attribute_accuracy"]["color"]["true"] == 1.0
    assert summary["gates"]["cross_attn/layer0"]["abs_tanh_alpha"] == 0.2
    assert os.path.getsize(os.path.join(good, "report.png")) > 10_000
    proc = subprocess.run([*tool, bad, "--check"], capture_output=True, text=True)
    assert proc.returncode == 1
    failed = [c["check"] for c in json.load(open(os.path.join(bad, "learning.json")))["checks"] if not c["pass"]]
    assert len(failed) == 2 and "size with shuffled" in failed[0] and "synthetic_shapes" in failed[1]
    proc = subprocess.run([*tool, str(tmp_path / "nothing")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no metrics" in proc.stderr


def _validate(layout, corpus, run_dir):
    from test_trainer import make_trainer

    trainer = make_trainer(layout, corpus, run_dir, 3, "data.val_every_steps=1", "data.val_batches=2")
    return trainer.validate()


def test_validation_reports_attribute_accuracy_on_every_rank_under_zero3(synthetic_corpus, tmp_path):
    """Two data-parallel ranks over ZeRO-3 partitioned weights: every forward is a collective, so
    both ranks must run the same number of them (a mismatch hangs); both report the same numbers."""
    from distributed import run_distributed

    results = run_distributed(_validate, 2, 1, tmp_path / "out", synthetic_corpus, str(tmp_path / "run"))
    assert results[0] == results[1]
    for cond in ("true", "shuffled", "no"):
        for group in ("color", "shape", "size"):
            assert 0.0 <= results[0][f"val/accuracy/{cond}_images/{group}"] <= 1.0
