"""Evaluation sets read from the files users have, in their standard layouts, as one record type.

- Captioning, Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`): images with
  `split`, `sentences[].raw`, and `filepath`/`filename` (COCO: `<root>/<filepath>/<filename>`,
  id = `cocoid`; Flickr30K: `<root>/<filename>`, id = the file name without extension, as
  OpenFlamingo's evaluation keys it).
- VQA (VQAv2, OK-VQA, VizWiz, TextVQA): a questions JSON (`questions[]` with `question_id`,
  `image_id`, `question`) and, for scored splits, an annotations JSON (`annotations[]` with
  `question_id` and 10 `answers[].answer`). Image files as each dataset names them: VQAv2/OK-VQA
  `COCO_<coco_split>_<image_id:012d>.jpg`, VizWiz the `image_id` itself (a file name), TextVQA
  `<image_id>.jpg`.
- HatefulMemes JSONL: one `{"id", "img", "text", "label"}` per line, `img` relative to the root.
- Classification, ImageNet-style: a folder of class folders (`<root>/<class>/<image>`, with an
  optional JSON mapping folder names to class names), or a JSONL of `{"image", "label"}`.
  `answers` holds the one true class name.

A record that names an image file that does not exist is an error naming the file (an
evaluation on a partial set would not be comparable to published numbers).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from flamingo_dist.config.schema import OPT_IN_SYNTHETIC_TASKS, SYNTHETIC_TASKS


@dataclass
class Example:
    id: str | int
    image: str  # path of the image file
    question: str | None = None  # VQA
    answers: list[str] = field(default_factory=list)  # captions (captioning), human answers (VQA)
    text: str | None = None  # HatefulMemes' caption
    label: int | None = None  # HatefulMemes


def _check_images(examples: list[Example], what: str) -> list[Example]:
    missing = [e.image for e in examples if not os.path.isfile(e.image)]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} image files are missing, e.g. {missing[:3]}")
    return examples


def load_karpathy(json_path: str, image_root: str, split: str) -> list[Example]:
    """Captioning examples of one Karpathy split (`train` includes `restval` for COCO)."""
    with open(json_path) as f:
        data = json.load(f)
    splits = {"train", "restval"} if split == "train" else {split}
    out = []
    for img in data["images"]:
        if img["split"] not in splits:
            continue
        if "cocoid" in img:
            ident, path = img["cocoid"], os.path.join(image_root, img.get("filepath", ""), img["filename"])
        else:
            ident, path = os.path.splitext(img["filename"])[0], os.path.join(image_root, img["filename"])
        out.append(Example(ident, path, answers=[s["raw"].strip() for s in img["sentences"]]))
    if not out:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    return _check_images(out, json_path)


def vqa_image_name(dataset: str, image_id, coco_split: str = "val2014") -> str:
    if dataset in ("vqav2", "okvqa"):
        return f"COCO_{coco_split}_{int(image_id):012d}.jpg"
    if dataset == "vizwiz":
        return str(image_id)
    if dataset == "textvqa":
        return f"{image_id}.jpg"
    raise ValueError(f"unknown VQA dataset {dataset!r} (vqav2, okvqa, vizwiz, textvqa)")


def load_vqa(questions_json: str, annotations_json: str | None, image_dir: str, dataset: str,
             coco_split: str = "val2014") -> list[Example]:
    """VQA examples; `answers` holds the human answers when annotations are given."""
    with open(questions_json) as f:
        questions = json.load(f)["questions"]
    answers: dict = {}
    if annotations_json is not None:
        with open(annotations_json) as f:
            answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in json.load(f)["annotations"]}
        unanswered = [q["question_id"] for q in questions if q["question_id"] not in answers]
        if unanswered:
            raise ValueError(f"{annotations_json}: no annotation for {len(unanswered)} questions, e.g. {unanswered[:3]}")
    out = [Example(q["question_id"], os.path.join(image_dir, vqa_image_name(dataset, q["image_id"], coco_split)),
                   question=q["question"], answers=answers.get(q["question_id"], [])) for q in questions]
    return _check_images(out, questions_json)


def load_hateful_memes(jsonl_path: str, image_root: str) -> list[Example]:
    out = []
    with open(jsonl_path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            label = row.get("label")
            if label not in (0, 1, None):
                raise ValueError(f"{jsonl_path}:{n}: label must be 0 or 1, got {label!r}")
            out.append(Example(row["id"], os.path.join(image_root, row["img"]), text=row["text"], label=label))
    return _check_images(out, jsonl_path)


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_classification(source: str, image_root: str | None = None, class_names_json: str | None = None) -> list[Example]:
    """ImageNet-style classification examples, from a folder of class folders or a JSONL file."""
    names: dict = {}
    if class_names_json is not None:
        with open(class_names_json) as f:
            names = json.load(f)
    out = []
    if os.path.isdir(source):
        for cls in sorted(os.listdir(source)):
            folder = os.path.join(source, cls)
            if os.path.isdir(folder):
                out += [Example(f"{cls}/{n}", os.path.join(folder, n), answers=[names.get(cls, cls)])
                        for n in sorted(os.listdir(folder)) if n.lower().endswith(_IMAGE_EXTS)]
    else:
        with open(source) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    label = names.get(row["label"], row["label"])
                    out.append(Example(row.get("id", n), os.path.join(image_root or "", row["image"]),
                                       answers=[label]))
    if not out:
        raise ValueError(f"{source}: no classification examples")
    return _check_images(out, source)


def write_synthetic_tasks(out_dir: str, num_images: int = 96, seed: int = 0, side: int = 32) -> dict[str, str]:
    """A synthetic evaluation suite in the standard layouts above, from images of shapes with
    known attributes: Karpathy-style captions (train/test), VQAv2-style questions and
    annotations (colour and shape questions, 10 human answers each, a few dissenting), and a
    HatefulMemes-style JSONL (label 1 when the shape is red). Returns the file paths by name."""
    import random

    from flamingo_dist.data.synthetic import COLORS, SHAPES, SIZES, draw_shape

    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, "val2014")
    os.makedirs(img_dir, exist_ok=True)
    images, questions, annotations, memes, shapes_cls = [], [], [], [], []
    colors = sorted(COLORS)
    for i in range(num_images):
        color, shape, size = rng.choice(colors), rng.choice(SHAPES), rng.choice(SIZES)
        name = vqa_image_name("vqav2", i, "val2014")
        draw_shape(color, shape, size, side, rng).save(os.path.join(img_dir, name))
        images.append({"filepath": "val2014", "filename": name, "cocoid": i,
                       "split": "test" if i % 4 == 0 else "train",
                       "sentences": [{"raw": f"a {size} {color} {shape} ."}, {"raw": f"a {color} {shape} ."},
                                     {"raw": f"the {shape} is {color} ."}]})
        for k, (q, a, other) in enumerate((("what color is the shape ?", color, rng.choice(colors)),
                                           ("what shape is it ?", shape, rng.choice(SHAPES)))):
            qid = i * 10 + k
            questions.append({"image_id": i, "question": q, "question_id": qid})
            humans = [a] * 8 + [other] * 2  # humans mostly agree
            annotations.append({"question_id": qid, "image_id": i, "answers": [
                {"answer": h, "answer_confidence": "yes", "answer_id": j + 1} for j, h in enumerate(humans)],
                "multiple_choice_answer": a, "question_type": "what", "answer_type": "other"})
        memes.append({"id": i, "img": os.path.join("val2014", name), "text": f"a {color} {shape}",
                      "label": int(color == "red")})
        shapes_cls.append({"id": i, "image": os.path.join("val2014", name), "label": shape})
    # Fast binding (fewshot.binding_episode): images of each shape; 240 queries, 20 support
    # images per shape. Their own generator: the images above stay as they were.
    rng, binding = random.Random(seed + 1), []
    for i in range(BINDING_QUERIES + BINDING_SUPPORT):
        shape = SHAPES[i % len(SHAPES)]
        name = f"binding_{i:05d}.png"
        draw_shape(rng.choice(colors), shape, rng.choice(SIZES), side, rng).save(os.path.join(img_dir, name))
        binding.append({"id": f"b{i}", "image": os.path.join("val2014", name), "label": shape})
    paths = {"karpathy": os.path.join(out_dir, "dataset_synthetic.json"),
             "vqa_questions": os.path.join(out_dir, "questions.json"),
             "vqa_annotations": os.path.join(out_dir, "annotations.json"),
             "memes": os.path.join(out_dir, "memes.jsonl"), "classes": os.path.join(out_dir, "shapes.jsonl"),
             "binding": os.path.join(out_dir, "binding.jsonl"),
             "image_root": out_dir, "image_dir": img_dir}
    with open(paths["karpathy"], "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    with open(paths["vqa_questions"], "w") as f:
        json.dump({"questions": questions}, f)
    with open(paths["vqa_annotations"], "w") as f:
        json.dump({"annotations": annotations}, f)
    with open(paths["memes"], "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in memes)
    with open(paths["classes"], "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in shapes_cls)
    with open(paths["binding"], "w") as f:
        f.writelines(json.dumps(b) + "\n" for b in binding)
    return paths


def load_task(spec: dict, base_dir: str = ".") -> tuple[str, str, list[Example], list[Example]]:
    """(name, kind, queries, support) from one task spec (a dict from eval.tasks_file):
      {name, kind: captioning, karpathy_json, image_root, query_split: test, support_split: train}
      {name, kind: vqa, dataset: vqav2|okvqa|vizwiz|textvqa, questions, annotations, image_dir,
       coco_split, support_questions, support_annotations, support_image_dir, support_coco_split}
      {name, kind: hateful_memes, jsonl, image_root, support_jsonl}
      {name, kind: classification, source, support_source (class folders or JSONL), image_root,
       class_names (optional JSON: folder name -> class name)}
    Relative paths are taken from base_dir (the tasks file's folder)."""
    def path(key: str, default: str | None = None) -> str:
        if key not in spec and default is None:
            raise ValueError(f"eval task {spec.get('name', spec)!r}: missing {key!r}")
        return os.path.join(base_dir, spec.get(key, default))

    kind, name = spec.get("kind"), spec.get("name", spec.get("kind"))
    if kind == "captioning":
        j, root = path("karpathy_json"), path("image_root")
        return name, kind, load_karpathy(j, root, spec.get("query_split", "test")), \
            load_karpathy(j, root, spec.get("support_split", "train"))
    if kind == "vqa":
        ds = spec.get("dataset", "vqav2")
        queries = load_vqa(path("questions"), path("annotations"), path("image_dir"), ds,
                           spec.get("coco_split", "val2014"))
        support = load_vqa(path("support_questions"), path("support_annotations"), path("support_image_dir"), ds,
                           spec.get("support_coco_split", "train2014"))
        return name, kind, queries, support
    if kind == "hateful_memes":
        root = path("image_root")
        return name, kind, load_hateful_memes(path("jsonl"), root), load_hateful_memes(path("support_jsonl"), root)
    if kind in ("classification", "binding", "binding_shuffled"):  # binding: the classes get labels per prompt
        root = path("image_root", ".")
        names = path("class_names") if "class_names" in spec else None
        return name, kind, load_classification(path("source"), root, names), \
            load_classification(path("support_source"), root, names)
    raise ValueError(f"eval task {name!r}: kind must be captioning, vqa, hateful_memes, classification, binding or "
                     f"binding_shuffled, got {kind!r}")


_SUITE_VERSION = "3"  # 3: the binding tasks; 2: 96 images, VQA split by question (colour, shape)
BINDING_QUERIES, BINDING_SUPPORT = 240, 60


def synthetic_suite(out_dir: str) -> dict[str, tuple[str, list[Example], list[Example]]]:
    """The synthetic suite as name -> (kind, queries, support), written when missing (or made
    by another version of this function). Queries are the first half of the images, support
    the second; VQA is one task per question (colour, shape)."""
    marker = os.path.join(out_dir, "DONE")
    have = None
    if os.path.isfile(marker):
        with open(marker) as f:
            have = f.read().strip()
    if have != _SUITE_VERSION:
        write_synthetic_tasks(out_dir)
        with open(marker, "w") as f:
            f.write(_SUITE_VERSION + "\n")
    karpathy, img = os.path.join(out_dir, "dataset_synthetic.json"), os.path.join(out_dir, "val2014")
    vqa = load_vqa(os.path.join(out_dir, "questions.json"), os.path.join(out_dir, "annotations.json"), img, "vqav2")
    memes = load_hateful_memes(os.path.join(out_dir, "memes.jsonl"), out_dir)
    shapes = load_classification(os.path.join(out_dir, "shapes.jsonl"), out_dir)
    binding = load_classification(os.path.join(out_dir, "binding.jsonl"), out_dir)
    half = len(memes) // 2  # one meme, one shape and two questions per image
    color_q = [q for q in vqa if q.question.startswith("what color")]
    shape_q = [q for q in vqa if q.question.startswith("what shape")]
    suite = {"synthetic_captions": ("captioning", load_karpathy(karpathy, out_dir, "test"),
                                    load_karpathy(karpathy, out_dir, "train")),
             "synthetic_vqa_color": ("vqa", color_q[:half], color_q[half:]),
             "synthetic_vqa_shape": ("vqa", shape_q[:half], shape_q[half:]),
             "synthetic_memes": ("hateful_memes", memes[:half], memes[half:]),
             "synthetic_shapes": ("classification", shapes[:half], shapes[half:]),
             # labels bound per prompt, with the true images and with them shuffled across it
             "synthetic_binding": ("binding", binding[:BINDING_QUERIES], binding[BINDING_QUERIES:]),
             "synthetic_binding_shuffled": ("binding_shuffled", binding[:BINDING_QUERIES],
                                            binding[BINDING_QUERIES:])}
    if tuple(suite) != SYNTHETIC_TASKS:  # the names eval.synthetic_tasks is validated against
        raise RuntimeError(f"internal: synthetic suite {tuple(suite)} != config's SYNTHETIC_TASKS {SYNTHETIC_TASKS}")
    return suite


def select_synthetic(suite: dict, names: list[str] | tuple[str, ...] = ()) -> dict:
    """The named tasks of the synthetic suite; none named: all but the opt-in ones (the binding
    pair, 240 queries each)."""
    unknown = [n for n in names if n not in suite]
    if unknown:
        raise ValueError(f"synthetic tasks {unknown} are not in the suite ({', '.join(suite)})")
    return {n: t for n, t in suite.items() if n in names or (not names and n not in OPT_IN_SYNTHETIC_TASKS)}
