"""Scorers with the published protocols' exact semantics.

- VQA accuracy: the official VQA evaluation (as OpenFlamingo's eval ships it). An answer is
  normalised (punctuation, number words, articles, contractions) only when the human answers of
  the question disagree; its accuracy is min(#matching humans / 3, 1) averaged over the 10
  leave-one-human-out subsets. The official code's quirks are kept on purpose, because published
  numbers come from it: the period rule `(?!<=\\d)(\\.)(?!\\d)` (a lookahead where a lookbehind
  was meant) and at most 32 period removals per answer (`re.UNICODE` passed as the count).
- CIDEr(-D): pycocoevalcap, computed once over the whole gathered set (its IDF depends on the
  corpus), after the PTB tokenizer. pycocoevalcap's tokenizer writes a temp file beside its own
  jar; we run a copy of its tokenizer folder in a temp directory, so read-only installs work.
- ROC-AUC: the Mann-Whitney statistic with ties counted one half (scikit-learn's value).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import re
import shutil
import tempfile

# ---------------------------------------------------------------------------------- VQA
_CONTRACTIONS = dict(pair.split(":") for pair in """aint:ain't arent:aren't cant:can't couldve:could've
couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't
hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've
he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've
isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've""".split())
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official evaluator's pattern
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)  # sic: count=32, as the official code passes it


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_normalize(answer: str) -> str:
    """The official answer normalisation (punctuation, then numbers/articles/contractions)."""
    return _digits_articles(_punctuation(answer))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """One question's accuracy in [0, 1]: min(#other humans agreeing / 3, 1), averaged over the
    leave-one-out subsets of the (usually 10) human answers."""
    if not human_answers:
        raise ValueError("vqa_accuracy: a question without human answers")
    humans = [_clean(a) for a in human_answers]
    pred = _clean(prediction)
    if len(set(humans)) > 1:  # the official rule: normalise only when the humans disagree
        humans = [vqa_normalize(a) for a in humans]
        pred = vqa_normalize(pred)
    total = 0.0
    for i in range(len(humans)):
        matches = sum(1 for j, a in enumerate(humans) if j != i and a == pred)
        total += min(1.0, matches / 3)
    return total / len(humans)


def vqa_score(predictions: dict, human_answers: dict) -> float:
    """Mean accuracy in percent over the questions of `human_answers` (id -> answers); every
    question needs a prediction."""
    missing = sorted(set(human_answers) - set(predictions), key=str)
    if missing:
        raise ValueError(f"vqa_score: {len(missing)} questions have no prediction (e.g. {missing[:3]})")
    return 100.0 * sum(vqa_accuracy(predictions[q], a) for q, a in human_answers.items()) / len(human_answers)


# ---------------------------------------------------------------------------------- ROC-AUC
def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    if len(scores) != len(labels):
        raise ValueError(f"roc_auc: {len(scores)} scores for {len(labels)} labels")
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg or len(pos) + len(neg) != len(labels):
        raise ValueError("roc_auc: labels must be 0/1 with both classes present")
    # rank-sum form (average ranks for ties), O(n log n)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


# ---------------------------------------------------------------------------------- CIDEr
@functools.lru_cache(maxsize=1)
def _ptb_tokenizer_class():
    """pycocoevalcap's PTBTokenizer, loaded from a copy of its folder (the .py and the Stanford
    jar) in a private temp directory: it writes its temp file beside the jar."""
    import pycocoevalcap.tokenizer.ptbtokenizer as original

    src = os.path.dirname(os.path.abspath(original.__file__))
    tmp = tempfile.mkdtemp(prefix="flamingo-ptb-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the process keeps using it until then
    dst = os.path.join(tmp, "tokenizer")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("_flamingo_ptbtokenizer", os.path.join(dst, "ptbtokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PTBTokenizer


def ptb_tokenize(captions: dict) -> dict:
    """id -> list of raw captions  ->  id -> list of PTB-tokenized captions (needs java)."""
    if shutil.which("java") is None:
        raise RuntimeError("CIDEr needs java for the PTB tokenizer (Debian: apt-get install default-jre-headless)")
    return _ptb_tokenizer_class()().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def cider(predictions: dict, references: dict) -> float:
    """CIDEr-D (pycocoevalcap) of id -> predicted caption against id -> reference captions, over
    the whole set at once; every reference id needs a prediction."""
    from pycocoevalcap.cider.cider import Cider

    missing = sorted(set(references) - set(predictions), key=str)
    if missing:
        raise ValueError(f"cider: {len(missing)} images have no prediction (e.g. {missing[:3]})")
    gts = ptb_tokenize(references)
    res = ptb_tokenize({k: [predictions[k]] for k in references})
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def gather_predictions(local: dict, group=None) -> dict:
    """Collective: the union of every rank's id -> prediction dict (ids must not repeat)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(local)
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    out: dict = {}
    for part in parts:
        clash = set(out) & set(part)
        if clash:
            raise ValueError(f"gather_predictions: ids predicted on two ranks: {sorted(clash, key=str)[:3]}")
        out.update(part)
    return out
