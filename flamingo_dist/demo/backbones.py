"""Tiny pretrained backbones for the synthetic corpus, made on the machine in about a minute and
cached, so the debug flavor trains a Flamingo whose frozen parts know something:

- `lm/`: a LLaMA-style LM pretrained on the corpus' text, saved as a Hugging Face LLaMA
  directory (config.json, model.safetensors, tokenizer); it loads through `model.lm.path` like
  real weights.
- `vit.pt`: the open_clip debug ViT pretrained contrastively on synthetic images and their
  captions (open_clip's own CLIP model and `ClipLoss`), an open_clip weights file for
  `model.vision.pretrained`.

Why the LM's pretraining text describes every image ("small red circle" where the image goes):
a frozen LM that never had to tell "red" from "blue" cannot be made to say either by a
cross-attention block. Its output rows for the attribute words stay nearly identical and no
direction of its hidden state selects one of them, so Flamingo training plateaus at chance
(docs/learning.md). Reading attributes from the context gives the LM exactly what a real LM
brings: hidden-state directions that mean "the colour is red", which the cross-attention blocks
then learn to write from the image. The same model shape without that text trains to chance.

Everything is seeded; the directory is written under a temporary name and renamed when complete,
so an interrupted build never looks finished, and `DONE` records the recipe (a directory built
for another LM shape or vision tower is refused, not reused) and what the pretraining reached.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
import socket
import time

import torch

from flamingo_dist.config.schema import ConfigError, LMConfig
from flamingo_dist.data import synthetic

log = logging.getLogger(__name__)

VERSION = 3  # 2: binding episodes in the LM's text; 3: the several-image reading kept trained beside them
LM_STEPS = 800
LM_BATCH = 32
LM_LR = 3e-3
VIT_STEPS = 600
VIT_BATCH = 256
VIT_LR = 2e-3
VIT_POOL = 4096
MIN_ACCURACY = 0.9  # what each backbone must reach on its own held-out check, or the build fails
BINDING_STEPS = 400  # then one batch in three holds binding episodes (synthetic.binding_plan) of up
BINDING_LR = 0.25  # (of LM_LR) after the attribute reading is learnt, which it must not undo
BINDING_IMAGES = 13  # to this many images: the labels become words the LM copies from its context
IMAGE_WORD = "img"  # where an image goes in the LM's text (a word of its own: "image" is in the corpus' text)
MAX_IMAGES = 5  # documents of up to this many images: the demo's few-shot prompts have five


class BackboneError(ConfigError):
    """A backbone directory that does not fit the config."""


class PretrainingFellShort(BackboneError):
    """A backbone did not learn what it is for (checked on held-out data after pretraining)."""


def recipe(lm: LMConfig, vision_model: str, image_size: int, seed: int = 0) -> dict:
    shape = {k: getattr(lm, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                         "num_kv_heads", "rope_theta", "rms_norm_eps", "tie_embeddings",
                                         "max_position_embeddings")}
    return {"version": VERSION, "corpus_version": synthetic.CORPUS_VERSION, "lm": shape, "vision_model": vision_model,
            "image_size": image_size, "seed": seed, "lm_steps": LM_STEPS, "vit_steps": VIT_STEPS}


RECIPE_EVOLUTION = ("version", "corpus_version", "lm_steps", "vit_steps")  # what this project changes


def outdated(have: dict, want: dict) -> bool:
    """A build of the same shapes by an earlier recipe of this project (a cache to rebuild, where
    a build for another LM shape or vision tower is refused)."""
    differ = {k for k in set(have) | set(want) if have.get(k) != want.get(k)}
    return bool(differ) and differ <= set(RECIPE_EVOLUTION)


def lm_path(root: str) -> str:
    return os.path.join(root, "lm")


def vit_path(root: str) -> str:
    return os.path.join(root, "vit.pt")


def read_done(root: str) -> dict | None:
    done = os.path.join(root, "DONE")
    if not os.path.isfile(done):
        return None
    with open(done) as f:
        return json.load(f)


def ensure_backbones(root: str, lm: LMConfig, vision_model: str, image_size: int, seed: int = 0) -> dict:
    """Build the backbones into `root` unless a complete build is there (whether it fits the
    config is checked by use_backbones); returns the DONE record."""
    have = read_done(root)
    want = recipe(lm, vision_model, image_size, seed)
    if have is not None and outdated(have["recipe"], want):
        log.warning(f"{root}: backbones of an earlier recipe of this project (version {have['recipe'].get('version')}, "
                    f"now {VERSION}); rebuilding them")
        shutil.rmtree(root)
        have = None
    if have is not None:
        return have
    if os.path.exists(root):
        raise BackboneError(f"model.synthetic_backbones: {root} exists but holds no complete build (no DONE file); "
                            "delete it to rebuild")
    return build_backbones(root, lm, vision_model, image_size, seed)


def use_backbones(model) -> list[str]:
    """Point a ModelConfig with `synthetic_backbones` at the built LM and ViT (absolute paths)
    and clear the field; the build must be there and match (ensure_backbones makes it)."""
    root = model.synthetic_backbones
    done = read_done(root)
    if done is None:
        raise BackboneError(f"model.synthetic_backbones: {root} holds no built backbones (build them with "
                            f"`python tools/build_backbones.py --out {root}`; training builds them when missing)")
    want = recipe(model.lm, model.vision.model_name, done["recipe"]["image_size"], done["recipe"]["seed"])
    if done["recipe"] != want:
        differ = sorted(k for k in set(want) | set(done["recipe"]) if want.get(k) != done["recipe"].get(k))
        raise BackboneError(f"model.synthetic_backbones: {root} holds backbones of another recipe ({', '.join(differ)}: "
                            f"{[done['recipe'].get(k) for k in differ]} there, {[want.get(k) for k in differ]} in this "
                            "config); delete it or choose another directory to build them for this config, or set "
                            "model.synthetic_backbones=null for a random LM and ViT")
    model.lm.path, model.vision.pretrained = os.path.abspath(lm_path(root)), os.path.abspath(vit_path(root))
    model.synthetic_backbones = None
    return [f"model: the synthetic backbones in {root} (LM {model.lm.path}, ViT {model.vision.pretrained})"]


def _building_prefix(root: str) -> str:
    """Builds go to `<root>.building-<host>-<pid>` and are renamed to root when complete; the host
    in the name lets a shared filesystem hold several nodes' builds."""
    return f"{root.rstrip(os.sep)}.building-{socket.gethostname()}-"


def remove_abandoned_builds(root: str) -> list[str]:
    """Remove the unfinished builds of this host's processes that no longer run (a build killed
    mid-way, e.g. by a time limit or Ctrl-C, leaves its folder behind); other hosts' builds and
    running ones stay. Returns the folders removed."""
    prefix, removed = _building_prefix(root), []
    for path in glob.glob(glob.escape(prefix) + "*"):
        pid = path[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info(f"removed {len(removed)} unfinished backbone build(s) of ended processes: {removed}")
    return removed


def build_backbones(root: str, lm: LMConfig, vision_model: str, image_size: int, seed: int = 0) -> dict:
    remove_abandoned_builds(root)
    tmp = f"{_building_prefix(root)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    log.info(f"building the synthetic backbones in {root} (LM {LM_STEPS + BINDING_STEPS} steps, ViT {VIT_STEPS} steps; once)")
    lm_stats = pretrain_lm(lm_path(tmp), lm, seed)
    vit_stats = pretrain_vit(vit_path(tmp), vision_model, image_size, seed)
    weak = {f"LM reading {k} from context": v for k, v in lm_stats["copy_accuracy"].items() if v < MIN_ACCURACY}
    if lm_stats["binding_accuracy"] < MIN_ACCURACY:
        weak["LM naming by the binding in its context"] = lm_stats["binding_accuracy"]
    weak.update({f"ViT zero-shot {k}": v for k, v in vit_stats["zero_shot_accuracy"].items() if v < MIN_ACCURACY})
    if weak:  # a Flamingo on such backbones cannot learn what the demo shows
        shutil.rmtree(tmp, ignore_errors=True)
        raise PretrainingFellShort(f"the synthetic backbones did not learn what they are for ({weak}, need "
                                   f">= {MIN_ACCURACY}); this build is not kept")
    done = {"recipe": recipe(lm, vision_model, image_size, seed), "lm": lm_stats, "vit": vit_stats,
            "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(tmp, "DONE"), "w") as f:
        json.dump(done, f, indent=1)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: keep its build if it is the same recipe
        shutil.rmtree(tmp, ignore_errors=True)
        other = read_done(root)
        if other is None or other["recipe"] != done["recipe"]:
            raise
        return other
    log.info(f"backbones ready in {done['seconds']:.0f}s: the LM reads attributes from context "
        f"{lm_stats['copy_accuracy']}, the ViT's zero-shot attribute accuracy {vit_stats['zero_shot_accuracy']}")
    return done


# ---------------------------------------------------------------------------------------- LM
def _on(tok, attrs: dict | None) -> list[int]:
    """The ids of an image's words (synthetic.describe) that the tokens after it carry, or zeros."""
    if attrs is None:
        return [0] * len(synthetic.ATTRIBUTES)
    return [tok.convert_tokens_to_ids(attrs[g]) for g in synthetic.ATTRIBUTES]


def lm_document(tok, rng: random.Random, max_images: int = MAX_IMAGES, describe: bool = True,
                kind: str = "attributes") -> tuple[list[int], list[list[int]], list[int]]:
    """One pretraining document (synthetic.plan of `kind`) as the LM reads it: token ids, per id
    the ids of the image words it carries (`on`, see `embed`), and per id the index of the
    attribute group (synthetic.ATTRIBUTES) of a word that its image determines, else -1 (where
    the LM's reading is measured); in binding episodes instead BOUND where the label is
    determined by an earlier image of the same value in the episode (the binding to read).

    Each image is the word IMAGE_WORD, and it and every text token after it, up to the next
    image, carry the image's description: the IDEFICS layout, where every text token after an
    image sees it through cross-attention. describe=False leaves the images out (the ablation
    of docs/learning.md: an LM that never had to tell the attributes apart)."""
    group_of = {tok.convert_tokens_to_ids(w): g for g, words in enumerate(synthetic.ATTRIBUTES.values())
                for w in words}
    ids, on, marks = [tok.bos_token_id], [_on(tok, None)], [-1]
    image, seen = None, set()
    for it in synthetic.plan(kind, rng, max_images):
        if not isinstance(it, str):
            if describe:
                image = it
                ids, on, marks = ids + [tok.convert_tokens_to_ids(IMAGE_WORD)], on + [_on(tok, it)], marks + [-1]
            continue
        for t in tok(it, add_special_tokens=False)["input_ids"]:
            ids.append(t)
            on.append(_on(tok, image))
            if kind == "binding":
                marks.append(BOUND if image is not None and image[synthetic.BINDING_ATTRIBUTE] in seen else -1)
            else:
                marks.append(group_of.get(t, -1) if image is not None else -1)
        if kind == "binding" and image is not None:
            seen.add(image[synthetic.BINDING_ATTRIBUTE])
    return ids + [tok.eos_token_id], on + [_on(tok, None)], marks + [-1]


BOUND = len(synthetic.ATTRIBUTES)  # lm_document's mark of a label its episode's binding determines


def embed(model, ids: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Token embeddings plus those of the image words each token carries (`on` [B, T, K], 0 for
    none).

    Why the tokens after an image carry its words: a frozen LM must bring the reading that
    Flamingo's cross-attention blocks then feed from the images. An LM that read descriptions
    written as text before the image's tokens ("small red circle dax ... circle" -> dax) needs an
    induction head (a previous-token head composed with a matching one) to name an image by the
    label bound earlier in the prompt, and this two-layer LM with 8-dimensional heads did not
    form one in 3000 steps: it only learnt to name one of the labels seen so far (0.45,
    docs/learning.md). With the image's words on the tokens that see it, one attention head
    that matches them and copies the label is enough, learnt in a few hundred steps."""
    emb = model.get_input_embeddings()
    return emb(ids) + (emb(on) * (on > 0)[..., None].to(emb.weight.dtype)).sum(-2)


def _lm_batch(tok, rng: random.Random, n: int, max_images: int, describe: bool = True, kind: str = "attributes"):
    """(ids, on, attention mask, labels, marks) of n documents (lm_document)."""
    docs = [lm_document(tok, rng, max_images, describe, kind) for _ in range(n)]
    T, K = max(len(ids) for ids, _, _ in docs), len(synthetic.ATTRIBUTES)
    ids, on = torch.full((n, T), tok.pad_token_id), torch.zeros(n, T, K, dtype=torch.long)
    marks, mask = torch.full((n, T), -1), torch.zeros(n, T, dtype=torch.long)
    for b, (d, o, m) in enumerate(docs):
        ids[b, :len(d)], on[b, :len(o)], marks[b, :len(m)], mask[b, :len(d)] = (torch.tensor(d), torch.tensor(o),
                                                                                torch.tensor(m), 1)
    return ids, on, mask, ids.masked_fill(mask == 0, -100), marks


def lm_batch_kind(step: int) -> tuple[str, int]:
    """(synthetic kind, most images per document) of the LM's pretraining batch at `step`.

    Every other batch holds one-image documents at first: reading the one description there is
    learnt in a few hundred steps, where documents of several images alone take several times
    longer and sometimes never get there (docs/learning.md); short batches are also cheap (a
    batch is as long as its longest document). After LM_STEPS, one batch in three holds binding
    episodes and the other two keep the reading of one and of several images: with binding
    episodes in place of the several-image batches, learning the binding cost the colour reading
    (0.85 on CI's CPU, 0.92 here, under the 0.9 floor; backbones version 2)."""
    if step < LM_STEPS:
        return "attributes", 1 if step % 2 == 0 else MAX_IMAGES
    return [("attributes", 1), ("attributes", MAX_IMAGES), ("binding", BINDING_IMAGES)][step % 3]


def pretrain_lm(out_dir: str, lm: LMConfig, seed: int, describe: bool = True) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = synthetic.build_tokenizer(out_dir, lm.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                         num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                         num_key_value_heads=lm.kv_heads, rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_norm_eps,
                         tie_word_embeddings=lm.tie_embeddings, max_position_embeddings=lm.max_position_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / LM_STEPS) if s < LM_STEPS else BINDING_LR)
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(LM_STEPS + BINDING_STEPS):
        kind, images = lm_batch_kind(step)
        ids, on, mask, labels, _ = _lm_batch(tok, rng, LM_BATCH, images, describe, kind)
        loss = model(inputs_embeds=embed(model, ids, on), attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 200 == 0:
            copy = lm_copy_accuracy(model, tok, random.Random(seed + 1))
            binding = lm_binding_accuracy(model, tok, random.Random(seed + 2))
            log.info(f"  LM step {step + 1}/{LM_STEPS + BINDING_STEPS} loss {loss.item():.3f}, reads from context {copy} "
                     f"and by its binding {binding} "
                f"({time.time() - t0:.0f}s)")
    copy = lm_copy_accuracy(model, tok, random.Random(seed + 1))
    binding = lm_binding_accuracy(model, tok, random.Random(seed + 2))
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"loss": round(loss.item(), 4), "copy_accuracy": copy, "binding_accuracy": binding,
            "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def lm_binding_accuracy(model, tok, rng: random.Random, docs: int = 128) -> float:
    """Top-1 accuracy of the labels an earlier image of the same value bound in the episode."""
    hit, total = _top1(model, _lm_batch(tok, rng, docs, BINDING_IMAGES, kind="binding"), BOUND)
    return round(hit / max(1, total), 4)


@torch.no_grad()
def lm_copy_accuracy(model, tok, rng: random.Random, docs: int = 128) -> dict[str, float]:
    """Top-1 accuracy of the attribute words that an image before them determines, in documents
    of up to MAX_IMAGES images."""
    batch = _lm_batch(tok, rng, docs, MAX_IMAGES)
    out = {}
    for i, name in enumerate(synthetic.ATTRIBUTES):
        hit, total = _top1(model, batch, i)
        out[name] = round(hit / max(1, total), 4)
    return out


def _top1(model, batch, mark: int) -> tuple[int, int]:
    ids, on, mask, _, marks = batch
    was_training = model.training
    pred = model.eval()(inputs_embeds=embed(model, ids, on), attention_mask=mask).logits[:, :-1].argmax(-1)
    model.train(was_training)
    where = marks[:, 1:] == mark
    return ((pred == ids[:, 1:]) & where).sum().item(), where.sum().item()


# --------------------------------------------------------------------------------------- ViT
_CLIP_WORDS = ["<pad>", "a", *synthetic.COLORS, *synthetic.SHAPES, *synthetic.SIZES]


def _caption_ids(attrs: dict, context: int, eot: int) -> list[int]:
    """"a small red circle" as ids of the open_clip text tower, ending with the end-of-text id
    (the highest: open_clip pools the text at its argmax)."""
    ids = [_CLIP_WORDS.index(w) for w in ("a", attrs["size"], attrs["color"], attrs["shape"])] + [eot]
    return ids + [0] * (context - len(ids))


def _image_pool(n: int, side: int, rng: random.Random):
    import numpy as np

    from flamingo_dist.data.processing import normalize_pixels

    attrs, images = [], []
    for _ in range(n):
        a = {"color": rng.choice(list(synthetic.COLORS)), "shape": rng.choice(synthetic.SHAPES),
             "size": rng.choice(synthetic.SIZES)}
        attrs.append(a)
        images.append(torch.from_numpy(np.array(synthetic.draw_shape(a["color"], a["shape"], a["size"], side, rng))))
    return attrs, normalize_pixels(torch.stack(images).permute(0, 3, 1, 2).contiguous())


def pretrain_vit(out_path: str, vision_model: str, image_size: int, seed: int) -> dict:
    import open_clip
    from open_clip.loss import ClipLoss

    from flamingo_dist.models.vision import register_model_config

    register_model_config(vision_model)
    torch.manual_seed(seed)
    model = open_clip.create_model(vision_model)
    if model.visual.image_size[0] != image_size:
        raise BackboneError(f"{vision_model} takes {model.visual.image_size[0]} px images, the data has {image_size}")
    context, vocab = model.context_length, model.vocab_size
    if len(_CLIP_WORDS) >= vocab:
        raise BackboneError(f"{vision_model}: its text tower's vocabulary ({vocab}) is too small for the captions")
    rng = random.Random(seed)
    attrs, pixels = _image_pool(VIT_POOL, image_size, rng)
    texts = torch.tensor([_caption_ids(a, context, vocab - 1) for a in attrs])
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=VIT_LR, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / VIT_STEPS))
    held_out = VIT_POOL // 4  # the last quarter is only for the probe below
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(VIT_STEPS):
        idx = torch.randint(0, VIT_POOL - held_out, (VIT_BATCH,), generator=g)
        image_f, text_f, scale = model(pixels[idx], texts[idx])[:3]
        loss = loss_fn(image_f, text_f, scale)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0:
            log.info(f"  ViT step {step + 1}/{VIT_STEPS} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    torch.save(model.state_dict(), out_path)
    split = VIT_POOL - held_out
    zero_shot = vit_zero_shot_accuracy(model, pixels[split:], attrs[split:], texts)
    return {"loss": round(loss.item(), 4), "zero_shot_accuracy": zero_shot, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def vit_zero_shot_accuracy(model, pixels: torch.Tensor, attrs: list[dict], texts: torch.Tensor) -> dict[str, float]:
    """Each attribute's accuracy when every image is matched to the nearest of all captions
    (CLIP's zero-shot classification), over the held-out images."""
    captions = sorted({tuple(t.tolist()) for t in texts})
    text_f = model.encode_text(torch.tensor(captions), normalize=True)
    image_f = model.encode_image(pixels, normalize=True)
    best = [captions[i] for i in (image_f @ text_f.T).argmax(-1).tolist()]
    out = {}
    for group in synthetic.ATTRIBUTES:
        hits = [_CLIP_WORDS[c[1:4][("size", "color", "shape").index(group)]] == a[group] for c, a in zip(best, attrs)]
        out[group] = round(sum(hits) / len(hits), 4)
    return out
