"""Evaluation sets in their standard file layouts (Karpathy JSON, VQA questions + annotations,
HatefulMemes JSONL), read from the synthetic suite the project writes, and the errors for
incomplete sets."""

import json
import os

import pytest

from flamingo_dist.eval.tasks import (
    load_classification,
    load_hateful_memes,
    load_karpathy,
    load_task,
    load_vqa,
    vqa_image_name,
    write_synthetic_tasks,
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_synthetic_tasks(str(tmp_path_factory.mktemp("tasks")), num_images=12, seed=1)


def test_karpathy_captions_by_split(suite):
    test = load_karpathy(suite["karpathy"], suite["image_root"], "test")
    train = load_karpathy(suite["karpathy"], suite["image_root"], "train")
    assert [e.id for e in test] == [0, 4, 8] and len(train) == 9
    assert all(os.path.isfile(e.image) and len(e.answers) == 3 for e in test + train)
    assert test[0].image.endswith("val2014/COCO_val2014_000000000000.jpg")
    with pytest.raises(ValueError, match="no images in split 'val'"):
        load_karpathy(suite["karpathy"], suite["image_root"], "val")


def test_flickr_style_entries_are_keyed_by_file_name(tmp_path):
    (tmp_path / "1000092795.jpg").write_bytes(b"x")
    data = {"images": [{"filename": "1000092795.jpg", "split": "test", "imgid": 0,
                        "sentences": [{"raw": " Two young guys . "}]}], "dataset": "flickr30k"}
    (tmp_path / "d.json").write_text(json.dumps(data))
    (ex,) = load_karpathy(str(tmp_path / "d.json"), str(tmp_path), "test")
    assert ex.id == "1000092795" and ex.answers == ["Two young guys ."]


def test_vqa_questions_with_ten_human_answers(suite):
    exs = load_vqa(suite["vqa_questions"], suite["vqa_annotations"], suite["image_dir"], "vqav2")
    assert len(exs) == 24 and all(len(e.answers) == 10 and e.question for e in exs)
    color_q = exs[0]
    with open(suite["karpathy"]) as f:
        first = json.load(f)["images"][0]["sentences"][1]["raw"]  # "a <color> <shape> ."
    assert color_q.answers.count(first.split()[1]) >= 8
    unscored = load_vqa(suite["vqa_questions"], None, suite["image_dir"], "vqav2")
    assert all(e.answers == [] for e in unscored)


def test_vqa_image_names_per_dataset():
    assert vqa_image_name("vqav2", 42, "train2014") == "COCO_train2014_000000000042.jpg"
    assert vqa_image_name("okvqa", "7") == "COCO_val2014_000000000007.jpg"
    assert vqa_image_name("vizwiz", "VizWiz_val_00000001.jpg") == "VizWiz_val_00000001.jpg"
    assert vqa_image_name("textvqa", "abc123") == "abc123.jpg"
    with pytest.raises(ValueError, match="unknown VQA dataset"):
        vqa_image_name("gqa", 1)


def test_hateful_memes_labels(suite):
    exs = load_hateful_memes(suite["memes"], suite["image_root"])
    assert len(exs) == 12 and {e.label for e in exs} <= {0, 1}
    assert all((e.label == 1) == e.text.startswith("a red") for e in exs)


def test_missing_images_and_unanswered_questions_are_errors_naming_them(suite, tmp_path):
    os.rename(os.path.join(suite["image_dir"], "COCO_val2014_000000000004.jpg"), str(tmp_path / "moved.jpg"))
    try:
        with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000004.jpg"):
            load_karpathy(suite["karpathy"], suite["image_root"], "test")
    finally:
        os.rename(str(tmp_path / "moved.jpg"), os.path.join(suite["image_dir"], "COCO_val2014_000000000004.jpg"))
    with open(suite["vqa_annotations"]) as f:
        ann = json.load(f)
    ann["annotations"] = ann["annotations"][1:]
    partial = tmp_path / "ann.json"
    partial.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"no annotation for 1 questions, e.g. \[0\]"):
        load_vqa(suite["vqa_questions"], str(partial), suite["image_dir"], "vqav2")


def test_classification_from_class_folders_or_jsonl(suite, tmp_path):
    for cls, n in (("n01", 2), ("n02", 1)):
        (tmp_path / "imagenet" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "imagenet" / cls / f"{i}.JPEG").write_bytes(b"x")
    (tmp_path / "imagenet" / "n02" / "notes.txt").write_text("not an image")
    (tmp_path / "names.json").write_text(json.dumps({"n01": "goldfish", "n02": "tench"}))
    exs = load_classification(str(tmp_path / "imagenet"), class_names_json=str(tmp_path / "names.json"))
    assert [(e.id, e.answers) for e in exs] == [("n01/0.JPEG", ["goldfish"]), ("n01/1.JPEG", ["goldfish"]),
                                                 ("n02/0.JPEG", ["tench"])]
    shapes = load_classification(suite["classes"], suite["image_root"])
    assert len(shapes) == 12 and {e.answers[0] for e in shapes} <= {"circle", "square", "triangle"}


def test_task_specs_name_what_is_missing(suite):
    spec = {"name": "memes", "kind": "hateful_memes", "jsonl": "memes.jsonl", "support_jsonl": "memes.jsonl",
            "image_root": "."}
    name, kind, queries, support = load_task(spec, suite["image_root"])
    assert (name, kind, len(queries), len(support)) == ("memes", "hateful_memes", 12, 12)
    with pytest.raises(ValueError, match="missing 'support_jsonl'"):
        load_task({k: v for k, v in spec.items() if k != "support_jsonl"}, suite["image_root"])
    with pytest.raises(ValueError, match="kind must be"):
        load_task({"name": "x", "kind": "retrieval"})
