"""Few-shot evaluation with the OpenFlamingo protocol, for our model at any layout.

Prompts (OpenFlamingo's evaluation): captioning `<image>Output:{caption}`, VQA `<image>Question:
{question} Short answer:{answer}`, HatefulMemes `<image>is an image with: '{text}' written on it.
Is it hateful? Answer:{yes|no}`; demonstrations first, the query last, in our IDEFICS token
layout (`data/layout.py`). k shots = k demonstrations with their images; 0 shots = two
demonstrations with their images removed (text only). Demonstrations come from the support set,
at random (seeded per trial and query) or by RICES (the support examples whose vision features
are nearest to the query's, most similar last; features are the vision encoder's CLS token,
cached on disk). Captions and answers are generated greedily (stopping at `</s>`) and scored once
over the whole gathered set (CIDEr, VQA accuracy); HatefulMemes ranks ` yes` against ` no` by
log-likelihood and reports ROC-AUC; classification (`<image>Output:{class}`) ranks every class name
of the set by summed log-likelihood after the prompt, whose KV cache is computed once, and reports
top-1 accuracy. The query set is split across data-parallel ranks and
gathered. Every result carries PROTOCOL_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics

import torch

from flamingo_dist.eval.metrics import cider, gather_predictions, roc_auc, vqa_score
from flamingo_dist.eval.tasks import Example

PROTOCOL_VERSION = "flamingo_dist-fewshot-1: OpenFlamingo prompts, 0-shot = 2 text-only demos, greedy decoding"
KINDS = ("captioning", "vqa", "hateful_memes", "classification")


def demo_text(kind: str, ex: Example, answer: str | None) -> str:
    """The text after a demonstration's (or the query's, answer=None) image."""
    if kind == "captioning":
        return "Output:" + ("" if answer is None else answer)
    if kind == "vqa":
        return f"Question:{ex.question} Short answer:" + ("" if answer is None else answer)
    if kind == "hateful_memes":
        return f"is an image with: '{ex.text}' written on it. Is it hateful? Answer:" + ("" if answer is None else answer)
    if kind == "classification":
        return "Output:" + ("" if answer is None else answer)
    raise ValueError(f"unknown task kind {kind!r} ({', '.join(KINDS)})")


def demo_answer(kind: str, ex: Example, rng: random.Random) -> str:
    if kind == "hateful_memes":
        return "yes" if ex.label == 1 else "no"
    return rng.choice(ex.answers) if kind == "captioning" else ex.answers[0]  # VQA/classification: the first


def postprocess(kind: str, text: str) -> str:
    """OpenFlamingo's clean-up: a VQA answer ends at the next 'Question'/'Answer'."""
    text = text.strip()
    if kind == "vqa":
        import re

        text = re.split("Question|Answer|Short", text, maxsplit=1)[0].strip()
    return text


class Prompter:
    """Turns demonstrations + a query into model inputs (ids, pixels, image mask)."""

    def __init__(self, tokenizer, image_size: int):
        from flamingo_dist.data.layout import FAKE_TOKEN, IMAGE_TOKEN
        from flamingo_dist.data.pipeline import image_transform

        self.tok = tokenizer
        self.transform = image_transform(image_size)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # never generated: an answer is text
        self.layout_token_ids = (self.image_id, tokenizer.convert_tokens_to_ids(FAKE_TOKEN))

    def image(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as img:
            return self.transform(img)

    def inputs(self, kind: str, demos: list[tuple[Example, str]], query: Example, with_demo_images: bool):
        from flamingo_dist.data.layout import document_text, image_attention_mask

        items, images = [], []
        for ex, answer in demos:
            if with_demo_images:
                items.append(None)
                images.append(ex.image)
            items.append(demo_text(kind, ex, answer) + " ")
        items += [None, demo_text(kind, query, None)]
        images.append(query.image)
        text, n = document_text(items, self.tok.bos_token, "")
        ids = torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])
        pixels = torch.stack([self.image(p) for p in images])[None]
        mask = image_attention_mask(ids, self.image_id, self.tok.eos_token_id, n)
        return ids, pixels, mask


def rices_features(model, prompter: Prompter, examples: list[Example], cache_dir: str | None) -> torch.Tensor:
    """L2-normalised CLS features of the vision encoder [n, V], cached on disk by image list."""
    key = hashlib.sha256("\n".join(e.image for e in examples).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"rices-{key}.pt") if cache_dir else None
    if path and os.path.isfile(path):
        return torch.load(path)
    feats = []
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            px = torch.stack([prompter.image(e.image) for e in examples[i:i + 32]])
            feats.append(model.vision(px)[:, 0].float())
    out = torch.nn.functional.normalize(torch.cat(feats), dim=-1)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # ranks that compute it at once each write whole files
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


def choose_demos(n: int, method: str, rng: random.Random, support: list[Example], query_feat=None,
                 support_feats=None, exclude=None) -> list[Example]:
    pool = [i for i, e in enumerate(support) if e.id != exclude]
    if n > len(pool):
        raise ValueError(f"{n} demonstrations asked, the support set has {len(pool)}")
    if method == "random":
        return [support[i] for i in rng.sample(pool, n)]
    if method == "rices":
        sims = support_feats[pool] @ query_feat
        top = sims.topk(n).indices.tolist()  # most similar first ...
        return [support[pool[i]] for i in reversed(top)]  # ... placed last, next to the query
    raise ValueError(f"unknown demonstration method {method!r} (random, rices)")


def evaluate(model, tokenizer, kind: str, queries: list[Example], support: list[Example], shots: int,
             method: str, seed: int, image_size: int, dp_rank: int = 0, dp_size: int = 1, dp_group=None,
             max_new_tokens: int = 20, feature_cache: str | None = None) -> tuple[float, dict]:
    """One trial: (the score over the whole query set, the gathered predictions by query id:
    generated text, or P(yes) for HatefulMemes). Collective over the data-parallel group."""
    from flamingo_dist.generate import continuation_logprobs, greedy

    prompter = Prompter(tokenizer, image_size)
    use_cache = getattr(model, "supports_cache", True)  # an exported HF model runs uncached
    n_demos, with_images = (2, False) if shots == 0 else (shots, True)
    feats = {}
    if method == "rices":
        feats = {"support": rices_features(model, prompter, support, feature_cache),
                 "query": rices_features(model, prompter, queries, feature_cache)}
    preds: dict = {}
    if kind == "classification":
        classes = sorted({e.answers[0] for e in queries + support})
        class_ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in classes]
    for qi in range(dp_rank, len(queries), dp_size):
        q = queries[qi]
        rng = random.Random(f"{seed}/{q.id}")  # the same demonstrations whatever the layout
        query_feat = feats["query"][qi] if feats else None
        demos = choose_demos(n_demos, method, rng, support, query_feat, feats.get("support"), exclude=q.id)
        ids, pixels, mask = prompter.inputs(kind, [(d, demo_answer(kind, d, rng)) for d in demos], q, with_images)
        if kind == "classification":  # rank every class name by log-likelihood after the cached prompt
            scores = continuation_logprobs(model, ids, pixels, mask, class_ids, use_cache=use_cache)
            preds[q.id] = classes[max(range(len(classes)), key=scores.__getitem__)]
        elif kind == "hateful_memes":
            yes, no = (tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in ("yes", "no"))
            ly, ln = continuation_logprobs(model, ids, pixels, mask, [yes, no], use_cache=use_cache)
            preds[q.id] = (torch.tensor([ly, ln]).softmax(0)[0].item(), q.label)
        else:
            new = greedy(model, ids, pixels, mask, max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id or 0, use_cache=use_cache,
                         banned_token_ids=prompter.layout_token_ids)
            preds[q.id] = postprocess(kind, tokenizer.decode(new[0], skip_special_tokens=True))
    if dp_size > 1:
        preds = gather_predictions(preds, dp_group)
    if kind == "captioning":
        return cider(preds, {q.id: q.answers for q in queries}), preds
    if kind == "vqa":
        return vqa_score(preds, {q.id: q.answers for q in queries}), preds
    if kind == "classification":
        return 100.0 * sum(preds[q.id] == q.answers[0] for q in queries) / len(queries), preds
    score = 100.0 * roc_auc([preds[q.id][0] for q in queries], [preds[q.id][1] for q in queries])
    return score, {k: p for k, (p, _) in preds.items()}


def run(model, tokenizer, tasks: dict[str, tuple[str, list[Example], list[Example]]], shots: list[int],
        methods: list[str], trials: int, image_size: int, out_json: str | None = None, dp_rank: int = 0,
        dp_size: int = 1, dp_group=None, feature_cache: str | None = None, tracker=None, step: int = 0,
        seed: int = 0, max_new_tokens: int = 20, writer: bool | None = None) -> dict:
    """Every task x shots x method, `trials` seeds each: mean and standard deviation; written as
    JSON and logged to MLflow (`eval/<task>/<shots>shot_<method>`, when a tracker is given) by the
    writer (default: data-parallel rank 0; pass the global rank 0 under TP)."""
    writer = dp_rank == 0 if writer is None else writer
    results: dict = {"protocol_version": PROTOCOL_VERSION, "step": step, "tasks": {}}
    for name, (kind, queries, support) in tasks.items():
        for k in shots:
            for method in methods:
                trial = [evaluate(model, tokenizer, kind, queries, support, k, method, seed + t, image_size,
                                  dp_rank, dp_size, dp_group, max_new_tokens, feature_cache) for t in range(trials)]
                scores = [score for score, _ in trial]
                results["tasks"].setdefault(name, {})[f"{k}shot_{method}"] = {
                    "mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "trials": scores,
                    "queries": len(queries),
                    # per trial, query id -> generated text (P(yes) for HatefulMemes), ids as strings
                    "predictions": [{str(q): p for q, p in preds.items()} for _, preds in trial]}
    if writer:
        if out_json:
            os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
            with open(out_json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(out_json + ".tmp", out_json)
        if tracker is not None:
            tracker.log_metrics({f"eval/{name}/{cfg}": v["mean"] for name, r in results["tasks"].items()
                                 for cfg, v in r.items()}, step)
    return results


class HFIdefics:
    """An exported (or any) transformers IDEFICS model behind the interface the harness uses:
    `logits(ids, pixels, mask)` (full logits, uncached) and `vision(pixels)` (the vision tower's
    last hidden state, CLS first: the features RICES ranks by)."""

    supports_cache = False

    def __init__(self, hf_model):
        self.hf = hf_model.eval()

    def logits(self, input_ids, pixel_values=None, image_attention_mask=None, cache=None):
        if cache is not None:
            raise ValueError("HFIdefics runs uncached (use_cache=False)")
        with torch.no_grad():
            return self.hf(input_ids=input_ids, pixel_values=pixel_values,
                           image_attention_mask=image_attention_mask).logits

    def vision(self, pixels):
        dtype = next(self.hf.model.vision_model.parameters()).dtype
        with torch.no_grad():
            return self.hf.model.vision_model(pixels.to(dtype)).last_hidden_state
