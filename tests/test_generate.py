"""Greedy decoding's bookkeeping: stop tokens, padding of stopped rows, the image mask of new
tokens (parity with stock IDEFICS generation is in test_export_idefics.py)."""

import pytest
import torch

from flamingo_dist.eval.generate import beam_search, greedy


class Scripted:
    """A stand-in model whose next token is scripted per row and step; records the masks it sees."""

    def __init__(self, script: list[list[int]], vocab: int = 10):
        self.script, self.vocab, self.masks = script, vocab, []

    def logits(self, ids, pixels, mask, cache=None):
        self.masks.append(None if mask is None else mask.clone())
        step = len(self.masks) - 1
        out = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for row, tokens in enumerate(self.script):
            out[row, -1, tokens[step]] = 1.0
        return out


def test_rows_stop_at_a_stop_token_and_are_padded_until_all_stop():
    model = Scripted([[5, 2, 7, 7], [6, 6, 3, 7]])
    prompt = torch.ones(2, 3, dtype=torch.long)
    mask = torch.tensor([[[1, 0], [1, 0], [0, 1]], [[1, 0], [0, 1], [0, 0]]])
    out = greedy(model, prompt, None, mask, 10, stop_token_ids=(2, 3), pad_token_id=0, use_cache=False)
    assert out.tolist() == [[5, 2, 0], [6, 6, 3]]  # row 0 stopped at 2 and is padded; both stopped after 3
    assert len(model.masks) == 3
    for k, seen in enumerate(model.masks):  # (uncached) every new token repeats the last prompt row of the mask
        assert seen.shape == (2, 3 + k, 2)
        assert torch.equal(seen[:, 3:], mask[:, -1:].expand(2, k, 2))


def test_banned_tokens_are_never_generated():
    model = Scripted([[4, 4, 6]])
    out = greedy(model, torch.ones(1, 2, dtype=torch.long), None, None, 3, banned_token_ids=(4,))
    assert 4 not in out.tolist()[0] and out.tolist()[0][2] == 6


def test_max_new_tokens_bounds_the_output_and_must_be_positive():
    model = Scripted([[4] * 5])
    assert greedy(model, torch.ones(1, 2, dtype=torch.long), None, None, 5).tolist() == [[4] * 5]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy(model, torch.ones(1, 2, dtype=torch.long), None, None, 0)


def _model_and_prompt(layout):
    """A debug model with every trainable weight moved (gates open), GQA and q/k norms, and a
    two-image prompt."""
    from test_export_idefics import trained_like

    from flamingo_dist.data.layout import image_attention_mask

    # four layers of four heads (two of them key/value heads), cross-attention before layers 0 and 2
    model, cfg = trained_like(layout, f"parallel.tensor_parallel_size={layout.tp_size}", "model.lm.num_layers=4",
                              "model.lm.num_heads=4", "model.lm.num_kv_heads=2", "model.xattn.cross_layer_interval=2",
                              "model.xattn.qk_layer_norms=true", "model.xattn.alpha_type=vector", seed=3)
    g = torch.Generator().manual_seed(0)
    V = cfg.model.lm.vocab_size
    ids = torch.randint(3, V, (2, 16), generator=g)
    ids[:, 0] = 1
    for p in (3, 9):  # <fake><image><fake>
        ids[:, p - 1], ids[:, p], ids[:, p + 1] = V, V + 1, V
    pixels = torch.randn(2, 2, 3, 32, 32, generator=g)
    return model, ids, pixels, image_attention_mask(ids, V + 1, 2, 2)


def _cached_vs_uncached(layout):
    model, ids, pixels, mask = _model_and_prompt(layout)
    calls = []
    vision_forward = model.vision.forward
    model.vision.forward = lambda x: calls.append(x.shape[0]) or vision_forward(x)
    out = {}
    for use_cache in (True, False):
        calls.clear()
        out[use_cache] = greedy(model, ids, pixels, mask, 12, use_cache=use_cache)
        out[f"vision_calls_{use_cache}"] = len(calls)
        out[f"beam_{use_cache}"] = beam_search(model, ids[:1], pixels[:1], mask[:1], 10, num_beams=3,
                                               use_cache=use_cache)
    out["greedy_row0"] = greedy(model, ids[:1], pixels[:1], mask[:1], 10)
    out["beam1"] = beam_search(model, ids[:1], pixels[:1], mask[:1], 10, num_beams=1)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_cached_generation_gives_exactly_the_tokens_of_uncached_generation(tp, tmp_path):
    from distributed import run_distributed

    for out in run_distributed(_cached_vs_uncached, tp, tp, tmp_path / "out"):
        assert out[True].shape == (2, 12)
        assert torch.equal(out[True], out[False]), f"{out[True].tolist()} vs {out[False].tolist()}"
        assert len(set(out[True].flatten().tolist())) > 2  # not a degenerate constant stream
        assert out["vision_calls_True"] == 1  # the vision encoder runs once per prompt
        assert out["vision_calls_False"] == 12
        assert torch.equal(out["beam_True"], out["beam_False"])  # beam search: cached == uncached too
        assert torch.equal(out["beam1"], out["greedy_row0"])  # one beam is greedy decoding


def _scoring(layout):
    from flamingo_dist.eval.generate import continuation_logprobs

    model, ids, pixels, mask = _model_and_prompt(layout)
    conts = [[5], [7, 9, 11], [300, 2], [7, 9, 12]]
    cached = continuation_logprobs(model, ids[:1], pixels[:1], mask[:1], conts)
    plain = continuation_logprobs(model, ids[:1], pixels[:1], mask[:1], conts, use_cache=False)
    return cached, plain


@pytest.mark.parametrize("tp", [1, 2])
def test_continuation_scores_with_a_cached_prefix_equal_whole_sequence_scores(tp, tmp_path):
    from distributed import run_distributed

    for cached, plain in run_distributed(_scoring, tp, tp, tmp_path / "out"):
        assert cached == pytest.approx(plain, rel=1e-5, abs=1e-5)
        assert sorted(range(4), key=cached.__getitem__) == sorted(range(4), key=plain.__getitem__)
        assert all(x < 0 for x in cached) and len(set(cached)) == 4
