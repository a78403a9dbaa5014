"""Greedy decoding's bookkeeping: stop tokens, padding of stopped rows, the image mask of new
tokens (parity with stock IDEFICS generation is in test_export_idefics.py)."""

import pytest
import torch

from flamingo_dist.generate import greedy


class Scripted:
    """A stand-in model whose next token is scripted per row and step; records the masks it sees."""

    def __init__(self, script: list[list[int]], vocab: int = 10):
        self.script, self.vocab, self.masks = script, vocab, []

    def logits(self, ids, pixels, mask):
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
    out = greedy(model, prompt, None, mask, 10, stop_token_ids=(2, 3), pad_token_id=0)
    assert out.tolist() == [[5, 2, 0], [6, 6, 3]]  # row 0 stopped at 2 and is padded; both stopped after 3
    assert len(model.masks) == 3
    for k, seen in enumerate(model.masks):  # every new token repeats the last prompt row of the mask
        assert seen.shape == (2, 3 + k, 2)
        assert torch.equal(seen[:, 3:], mask[:, -1:].expand(2, k, 2))


def test_max_new_tokens_bounds_the_output_and_must_be_positive():
    model = Scripted([[4] * 5])
    assert greedy(model, torch.ones(1, 2, dtype=torch.long), None, None, 5).tolist() == [[4] * 5]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy(model, torch.ones(1, 2, dtype=torch.long), None, None, 0)
