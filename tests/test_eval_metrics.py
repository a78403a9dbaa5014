"""Scorers against their references: VQA accuracy on hand-computed official cases, ROC-AUC
against scikit-learn, CIDEr gathered from 2 ranks against one direct pycocoevalcap call."""

import random

import pytest
from distributed import run_distributed

from flamingo_dist.eval.metrics import roc_auc, vqa_accuracy, vqa_normalize, vqa_score


@pytest.mark.parametrize("raw,normalized", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),  # number words
    ("the dog", "dog"), ("A cat and an apple", "cat and apple"),  # articles
    ("dont", "don't"), ("Its a hes", "its he's"),  # contractions (after lower-casing and articles)
    ("yes.", "yes"), ("3.5", "3.5"), ("mr. smith", "mr smith"),  # periods, not decimal points
    ("red,white", "red white"), ("red, white", "red white"), ("1,000", "1000"),  # commas
    ("black-and-white", "black and white"), ("what?!", "what"), ("(left)", "left"),
])
def test_official_answer_normalization(raw, normalized):
    assert vqa_normalize(raw) == normalized


def test_accuracy_is_min_humans_over_3_averaged_over_the_10_leave_one_out_subsets():
    humans = ["2"] * 2 + ["3"] * 8
    # removing one of the two "2"s leaves 1 match (1/3); removing a "3" leaves 2 (2/3)
    assert vqa_accuracy("two", humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("3", humans) == pytest.approx((2 * 1 + 8 * 1) / 10)  # 8 or 7 matches: capped at 1
    humans = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("Yes.", humans) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert vqa_accuracy("maybe", humans) == 0.0
    # all humans agree: the official evaluator does not normalise, so "two" != "2"
    assert vqa_accuracy("two", ["2"] * 10) == 0.0 and vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_score({1: "two", 2: "maybe"}, {1: ["2"] * 2 + ["3"] * 8, 2: ["yes"] * 10}) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="no prediction"):
        vqa_score({}, {1: ["yes"]})


def test_roc_auc_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = random.Random(0)
    labels = [rng.randint(0, 1) for _ in range(300)]
    scores = [round(rng.gauss(0.4 * y, 1.0), 1) for y in labels]  # rounding makes ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.5, 0.5], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])


REFERENCES = {
    1: ["A red circle on a white background.", "a small red circle", "There is a red round shape."],
    2: ["Two blue squares, side by side.", "two squares that are blue", "Blue squares."],
    3: ["A green triangle!", "a triangle, green", "one green triangle pointing up"],
    4: ["a yellow star", "A star that is yellow.", "Yellow five-pointed star."],
}
PREDICTIONS = {1: "a red circle", 2: "two blue squares", 3: "a green square", 4: "a yellow star."}


def _gathered_cider(layout):
    import torch.distributed as dist

    from flamingo_dist.eval.metrics import cider, gather_predictions

    mine = {k: v for k, v in PREDICTIONS.items() if k % 2 == layout.rank}  # each rank predicted half
    return cider(gather_predictions(mine, dist.group.WORLD), REFERENCES)


def test_cider_from_two_ranks_equals_one_direct_pycocoevalcap_call(tmp_path):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": PREDICTIONS[k]}] for k in REFERENCES})
    direct, _ = Cider().compute_score(gts, res)
    assert direct > 0
    for score in run_distributed(_gathered_cider, 2, 1, tmp_path / "out"):
        assert score == direct
