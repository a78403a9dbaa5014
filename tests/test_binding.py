"""Fast concept binding (flamingo_dist/eval/fewshot.py `binding_episode`, the synthetic suite's
binding pair, the corpus' binding episodes): labels are drawn afresh for every prompt, the
prompt shows k images per class each followed by its label, and the score is the label bound in
that prompt. A model that reads the binding from its prompt scores 100 at every shot count and
chance with the images shuffled or not shown; one that cannot read it scores chance."""

import dataclasses
import os
import random
from collections import Counter

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from flamingo_dist.eval.tasks import synthetic_suite

    return synthetic_suite(str(tmp_path_factory.mktemp("suite")))


def test_an_episode_binds_fresh_labels_k_images_per_class_and_the_query_label(suite):
    from flamingo_dist.data.synthetic import BINDING_LABELS
    from flamingo_dist.eval.fewshot import binding_episode

    _, queries, support = suite["synthetic_binding"]
    bindings = set()
    for i, q in enumerate(queries[:30]):
        demos, answer, candidates, order = binding_episode(q, support, 2, random.Random(i), BINDING_LABELS)
        assert order is None and len(candidates) == 3 == len(set(candidates))
        assert Counter(ex.answers[0] for ex, _ in demos) == {"circle": 2, "square": 2, "triangle": 2}
        label_of = {ex.answers[0]: label for ex, label in demos}
        assert all(label_of[ex.answers[0]] == label for ex, label in demos)  # one label per class
        assert answer == label_of[q.answers[0]] and q not in [ex for ex, _ in demos]
        bindings.add(tuple(sorted(label_of.items())))
    assert len(bindings) >= 25  # drawn afresh: hardly any two prompts share their binding
    demos, answer, candidates, order = binding_episode(queries[0], support, 0, random.Random(0), BINDING_LABELS)
    assert sorted(label for _, label in demos) == sorted(candidates) and answer in candidates
    _, _, _, order = binding_episode(queries[0], support, 4, random.Random(0), BINDING_LABELS, shuffle_images=True)
    assert sorted(order) == list(range(13)) and order != list(range(13))
    with pytest.raises(ValueError, match="5 shots asked, class .* has 4"):
        binding_episode(queries[0], support[:12], 5, random.Random(0), BINDING_LABELS)


class _Oracle:
    """Recognises every image (by its pixels) and names the query by the label that follows a
    prompt image of the same class: reads the binding exactly when the prompt shows it. With
    `blind`, it names the most recent label instead (uses the labels, not the images)."""

    supports_cache = False

    def __init__(self, tok, prompter, examples, blind=False):
        self.tok, self.blind = tok, blind
        self.cls = {self._key(prompter.image(e.image)): e.answers[0] for e in examples}

    @staticmethod
    def _key(px):
        return hash(px.numpy().round(3).tobytes())

    def logits(self, ids, pixels=None, mask=None, cache=None):
        from flamingo_dist.data.synthetic import BINDING_LABELS

        T = ids.shape[1]
        out = torch.zeros(1, T, len(self.tok))
        toks = self.tok.convert_ids_to_tokens(ids[0].tolist())
        label_pos = [t for t in range(T) if toks[t] in BINDING_LABELS]
        img_pos = [t for t in range(T) if toks[t] == "<image>"]
        prompt_end = max(img_pos)  # the query's image: the labels after it are the continuation
        shown = [t for t in label_pos if t < prompt_end]
        if self.blind or len(img_pos) == 1:
            guess = toks[shown[-1]]
        else:
            classes = [self.cls[self._key(pixels[0, n])] for n in range(len(img_pos))]
            query = classes[-1]
            guess = next((toks[t] for n, t in enumerate(shown) if classes[n] == query), toks[shown[-1]])
        out[0, prompt_end:, self.tok.convert_tokens_to_ids(guess)] = 10.0
        return out


def test_the_score_is_the_label_bound_in_each_prompt_and_the_controls_are_at_chance(suite, tokenizer):
    from flamingo_dist.eval.fewshot import Prompter, evaluate

    _, queries, support = suite["synthetic_binding"]
    queries = queries[:90]
    oracle = _Oracle(tokenizer, Prompter(tokenizer, 32), queries + support)
    blind = _Oracle(tokenizer, Prompter(tokenizer, 32), queries + support, blind=True)
    for shots in (1, 4):
        score, preds = evaluate(oracle, tokenizer, "binding", queries, support, shots, "random", 0, 32)
        assert score == 100.0, shots
        assert len({p for ps in preds.values() for p in ps}) >= 6  # the labels change from prompt to prompt
        shuffled, _ = evaluate(oracle, tokenizer, "binding_shuffled", queries, support, shots, "random", 0, 32)
        assert shuffled <= 100 / 3 + 15, (shots, shuffled)  # ~chance: the images no longer match their labels
        blind_score, _ = evaluate(blind, tokenizer, "binding", queries, support, shots, "random", 0, 32)
        assert blind_score <= 100 / 3 + 15, (shots, blind_score)
    zero, preds = evaluate(oracle, tokenizer, "binding", queries, support, 0, "random", 0, 32)
    assert zero <= 100 / 3 + 15  # 0 shots: the labels are shown, their binding is not
    assert all(len(ps) == 3 for ps in preds.values())  # three label draws per query at 0 shots


def test_the_binding_pair_runs_only_when_named_and_unknown_labels_are_refused(suite, tokenizer, tmp_path):
    from flamingo_dist.eval.fewshot import evaluate
    from flamingo_dist.eval.tasks import select_synthetic

    assert "synthetic_binding" not in select_synthetic(suite) and "synthetic_shapes" in select_synthetic(suite)
    assert list(select_synthetic(suite, ["synthetic_binding"])) == ["synthetic_binding"]
    with pytest.raises(ValueError, match="synthetic_bindings"):
        select_synthetic(suite, ["synthetic_bindings"])
    _, queries, support = suite["synthetic_binding"]
    with pytest.raises(ValueError, match=r"label words \['zorb'\] are not in the tokenizer"):
        evaluate(None, tokenizer, "binding", queries[:1], support, 1, "random", 0, 32, binding_labels=("dax", "wug",
                                                                                                       "zorb"))


def test_training_episodes_bind_labels_per_document():
    from flamingo_dist.data.synthetic import BINDING_ATTRIBUTE, binding_plan

    rng, bindings = random.Random(0), set()
    for _ in range(50):
        items = binding_plan(rng, 8)
        pairs = [(items[i][BINDING_ATTRIBUTE], items[i + 1].strip()) for i in range(0, len(items), 2)]
        assert 2 <= len(pairs) <= 8
        assert len({v: lab for v, lab in pairs}) == len(set(pairs))  # one label per value in a document
        bindings.add(tuple(sorted(set(pairs))))
    assert len(bindings) >= 45


def test_a_synthetic_source_names_a_known_corpus_and_no_shards(tmp_path):
    from flamingo_dist.config.load import config_from_dict, load_config
    from flamingo_dist.config.schema import ConfigError

    good = load_config(os.path.join(REPO, "configs", "demo_fewshot.yaml"))
    assert [s["synthetic"] for s in good.data.sources] == ["attributes", "binding"]
    for source, message in (({"name": "b", "synthetic": "bindings"}, "synthetic: 'bindings' is not one of attributes"),
                            ({"name": "b", "synthetic": "binding", "shards": str(tmp_path)}, "takes no shards"),
                            ({"name": "b"}, r"shards: required \(or .synthetic\)")):
        raw = dataclasses.asdict(load_config())
        raw["data"]["sources"] = [source]
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw)
