"""A small synthetic interleaved image-text corpus, written as webdataset tar shards, and the
word-level tokenizer that covers it. Images are coloured shapes on a coloured background; the
text after each image names its size, colour or shape (in one of the STYLES below), so a debug
model can learn to read images. Nothing is downloaded.

Sample format (OBELICS-style, the format the real pipeline reads too):
  <key>.json  {"texts": [str | null, ...], "images": [member name | null, ...]}  (parallel lists)
  <key>.<name>.png  one member per image
"""

from __future__ import annotations

import io
import json
import os
import random

from flamingo_dist.config.schema import SYNTHETIC_KINDS

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
WORDS = ["a", "an", "the", "this", "is", "image", "of", "shows", "picture", "here", "on", "background",
         "next", "and", "there", "document", "about", "shapes", "colors", "look", "at", "we", "see",
         "photo", "it", *COLORS, *SHAPES, *SIZES, ".", ",", ":",
         # the few-shot prompts of flamingo_dist/eval (appended: earlier ids stay as they were)
         "Output", "Question", "Short", "answer", "Answer", "Is", "hateful", "?", "'", "with", "written",
         "what", "color", "shape", "yes", "no",
         # corpus version 3: a size question, so size is as often supervised as colour
         "size",
         # corpus version 4: fast-binding episodes (BINDING_LABELS)
         "dax", "wug", "blicket", "fep", "zup", "toma", "kiki", "bouba", "gazzer", "tufa", "lorp",
         "mib",
         # where an image goes in the synthetic LM's pretraining text (flamingo_dist/demo/backbones.py)
         "img"]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB_SIZE = 512
INTROS = ["this document is about shapes .", "we look at colors and shapes .", "here is a picture .",
          "look at the image ."]


def build_tokenizer(out_dir: str, vocab_size: int = VOCAB_SIZE):
    """A LLaMA-like word-level tokenizer (<s> prepended, </s> as eos, <unk> as pad) of exactly
    `vocab_size` tokens, saved to `out_dir` in Hugging Face format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + WORDS
    vocab += [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def draw_shape(color: str, shape: str, size: str, side: int = 32, rng: random.Random | None = None):
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    bg = rng.choice([c for c in COLORS if c != color])
    img = Image.new("RGB", (side, side), COLORS[bg])
    d = ImageDraw.Draw(img)
    r = side * (0.4 if size == "large" else 0.2)
    cx, cy = side / 2 + rng.uniform(-2, 2), side / 2 + rng.uniform(-2, 2)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


# What follows each image, by document style: every image of a document uses one style, so a
# document reads like a few-shot prompt of the evaluation suite (flamingo_dist/eval/fewshot.py)
# or like a caption list. The eval prompts' formats are in the corpus on purpose: the debug
# backbones are pretrained on its text, and the demo measures whether the model reads the
# images within these formats, not open-world in-context learning. No style shares a prefix with
# another up to its first attribute word ("Output:a small red circle" beside "Output:circle" would
# leave the first image of a document ambiguous: docs/learning.md).
STYLES = {
    "caption": " this image shows a {size} {color} {shape} .",
    "output_shape": "Output:{shape}",
    "vqa_color": "Question:what color is the shape ? Short answer:{color}",
    "vqa_shape": "Question:what shape is it ? Short answer:{shape}",
    "vqa_size": "Question:what size is the shape ? Short answer:{size}",
}
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}
"""The words a model can only predict from the image: top-1 accuracy over them with true,
shuffled and no images is the demo's learning measure (flamingo_dist/eval/attributes.py)."""


def document_plan(rng: random.Random, max_images: int = 3, styles: tuple[str, ...] = tuple(STYLES)) -> list:
    """One document as an interleaved list: text (str) or an image's attributes (a dict with
    color, shape, size). A caption list always opens with an intro sentence; the other styles
    half of the time, the other half they open with the image, as the evaluation prompts do."""
    style = rng.choice(styles)
    items: list = [rng.choice(INTROS)] if style == "caption" or rng.random() < 0.5 else []
    for _ in range(rng.randint(1, max_images)):
        attrs = random_attrs(rng)
        items += [attrs, STYLES[style].format(**attrs) + " "]
    return items


# Fast concept binding (Frozen, Tsimpoukelli et al. 2021): an episode draws BINDING_VALUES labels
# afresh from BINDING_LABELS and binds them to the values of one attribute for that document only;
# each image is followed by its label alone. A label is predictable only after an earlier image
# of the same value in the same document showed it, so the only way to name an image is to read
# the binding from the prompt. The labels are in the vocabulary and in the LM's pretraining text,
# never with a fixed meaning.
BINDING_LABELS = ("dax", "wug", "blicket", "fep", "zup", "toma", "kiki", "bouba", "gazzer", "tufa", "lorp", "mib")
BINDING_ATTRIBUTE = "shape"
BINDING_VALUES = SHAPES


def binding_text(label: str | None) -> str:
    """The text after an image of a binding episode (label None: the query's, to be completed).
    The label follows its image directly: a prompt word between them ("Name:dax") makes the LM
    match on the word before the prompt instead of the token before the label, which the tiny
    LM never learnt in 2000 steps (docs/learning.md), where plain induction takes 100."""
    return "" if label is None else label


def random_attrs(rng: random.Random) -> dict:
    """An image's attributes, drawn in this order (colour, shape, size): the corpus depends on it."""
    return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES)}


def binding_plan(rng: random.Random, max_images: int, labels: tuple[str, ...] | None = None) -> list:
    """One training episode as an interleaved list (see document_plan): 2 to max_images images of
    random attributes, each followed by the label its BINDING_ATTRIBUTE value has in this episode
    (drawn afresh per episode unless `labels` fixes them: the mutation of tests/test_learning.py)."""
    labels = labels or tuple(rng.sample(BINDING_LABELS, len(BINDING_VALUES)))
    binding = dict(zip(BINDING_VALUES, labels))
    items: list = []
    for _ in range(rng.randint(2, max_images)):
        attrs = random_attrs(rng)
        items += [attrs, binding_text(binding[attrs[BINDING_ATTRIBUTE]]) + " "]
    return items


def describe(attrs: dict) -> str:
    """An image written as text, where the LM's pretraining text has it (flamingo_dist/demo)."""
    return f"{attrs['size']} {attrs['color']} {attrs['shape']}"


KINDS = SYNTHETIC_KINDS
"""What a synthetic corpus holds: documents of the STYLES (attributes) or binding episodes."""


def plan(kind: str, rng: random.Random, max_images: int) -> list:
    if kind == "attributes":
        return document_plan(rng, max_images)
    if kind == "binding":
        return binding_plan(rng, max_images)
    raise ValueError(f"unknown synthetic corpus kind {kind!r} ({', '.join(KINDS)})")


def make_document(rng: random.Random, max_images: int = 3, side: int = 32, kind: str = "attributes") -> tuple[list, dict]:
    """(items, images): items is the interleaved list (str or image member name)."""
    items, images = [], {}
    for it in plan(kind, rng, max_images):
        if isinstance(it, str):
            items.append(it)
        else:
            name = f"img{len(images)}.png"
            images[name] = draw_shape(it["color"], it["shape"], it["size"], side, rng)
            items.append(name)
    return items, images


def write_corpus(out_dir: str, num_docs: int = 256, docs_per_shard: int = 64, seed: int = 0,
                 side: int = 32, vocab_size: int = VOCAB_SIZE, max_images: int = 3,
                 kind: str = "attributes") -> list[str]:
    """Write tokenizer/ and shard-NNNNN.tar files to out_dir; returns the shard paths."""
    from flamingo_dist.data.shards import ShardWriter

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(os.path.join(out_dir, "tokenizer"), vocab_size)
    rng = random.Random(seed)
    writer = ShardWriter(out_dir, "shard", docs_per_shard)  # a crash never leaves a half-written shard behind
    for i in range(num_docs):
        items, images = make_document(rng, max_images, side, kind)
        texts = [None if it in images else it for it in items]
        names = [it if it in images else None for it in items]
        sample = {"__key__": f"doc{i:06d}", "json": json.dumps({"texts": texts, "images": names})}
        for name, img in images.items():
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sample[name] = buf.getvalue()
        writer.write(sample)
    paths = writer.close().shards
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        json.dump(_recipe(num_docs, seed, side, vocab_size, max_images, kind), f)
    return paths


CORPUS_VERSION = 3  # 3: the vqa_size style; 2: document styles (STYLES); 1 had captions only. (Binding
# episodes came as a kind, in the recipe: a corpus from before records none and holds attributes.)


def _recipe(num_docs: int, seed: int, side: int, vocab_size: int, max_images: int, kind: str) -> dict:
    return {"version": CORPUS_VERSION, "kind": kind, "num_docs": num_docs, "seed": seed, "image_size": side,
            "vocab_size": vocab_size, "max_images": max_images}


def ensure_corpus(out_dir: str, num_docs: int, seed: int = 0, side: int = 32, vocab_size: int = VOCAB_SIZE,
                  docs_per_shard: int = 16, max_images: int = 3, kind: str = "attributes") -> str:
    """Generate the corpus unless a complete one (marked DONE) is there; a complete one made
    with other settings is an error rather than silently reused."""
    done = os.path.join(out_dir, "DONE")
    want = _recipe(num_docs, seed, side, vocab_size, max_images, kind)
    if not os.path.isfile(done):
        write_corpus(out_dir, num_docs=num_docs, docs_per_shard=docs_per_shard, seed=seed, side=side,
                     vocab_size=vocab_size, max_images=max_images, kind=kind)
        return out_dir
    with open(done) as f:
        have = json.load(f)
    # Size and seed only change how much data there is; the content's version, image size,
    # vocabulary and images per document must match.
    have.setdefault("kind", "attributes")
    if any(have.get(k) != want[k] for k in ("version", "kind", "image_size", "vocab_size", "max_images")):
        raise ValueError(f"data.synthetic_dir: {out_dir} holds a synthetic corpus made with {have}, but this run "
                         f"needs {want} (image size, vocabulary and images per document follow the config); "
                         "delete it or choose another data.synthetic_dir")
    return out_dir
