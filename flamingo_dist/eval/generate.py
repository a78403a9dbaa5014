"""Greedy decoding for our model with the semantics of transformers' IDEFICS generation: each new
token reuses the last prompt row of the image attention mask (it sees the images the last prompt
token sees), a row that produced a stop token is padded from then on, and decoding ends when
every row has stopped or after max_new_tokens.

By default the decoder is incremental (`models.flamingo.GenerationCache`): the vision encoder and
the resampler run once per prompt, each cross-attention block computes the media's keys and
values once, and each LM layer keeps the keys and values of the tokens so far, so a new token
costs one token's forward. `use_cache=False` recomputes the whole sequence for every token (the
reference the cached path is tested against). Works at any TP size (every TP rank of a group
computes the same tokens).

`beam_search` keeps the `num_beams` best partial sequences by summed log-probability (3 beams by
default, as OpenFlamingo evaluates); a sequence that ends with a stop token among the best
`num_beams` candidates of a step is finished with the score sum / length ** length_penalty, and
the best finished or surviving sequence wins, as in transformers' beam search.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, input_ids_BT: torch.Tensor, pixel_values_BNCP: torch.Tensor | None,
           image_attention_mask_BTN: torch.Tensor | None, max_new_tokens: int,
           stop_token_ids: tuple[int, ...] = (), pad_token_id: int = 0, use_cache: bool = True,
           banned_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """The new tokens [B, <= max_new_tokens] (prompts must not be padded). `banned_token_ids`
    are never generated (e.g. `<image>` and `<fake_token_around_image>`, as IDEFICS' examples
    pass them as bad_words_ids)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    from flamingo_dist.models.flamingo import GenerationCache

    mask = image_attention_mask_BTN
    row_B1N = mask[:, -1:] if mask is not None else None  # the image row every new token reuses
    stops = torch.tensor(sorted(stop_token_ids), dtype=input_ids_BT.dtype, device=input_ids_BT.device)
    done = torch.zeros(input_ids_BT.shape[0], dtype=torch.bool, device=input_ids_BT.device)
    cache = GenerationCache() if use_cache else None
    ids, new = input_ids_BT, []
    logits_B = model.logits(ids, pixel_values_BNCP, mask, cache=cache)[:, -1]
    banned = list(banned_token_ids)
    for step in range(max_new_tokens):
        if banned:
            logits_B = logits_B.index_fill(-1, torch.tensor(banned, device=logits_B.device), float("-inf"))
        next_B = logits_B.argmax(dim=-1).masked_fill(done, pad_token_id)
        done = done | torch.isin(next_B, stops)
        new.append(next_B)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if cache is not None:
            logits_B = model.logits(next_B[:, None], None, row_B1N, cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, next_B[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, row_B1N], dim=1)
            logits_B = model.logits(ids, pixel_values_BNCP, mask)[:, -1]
    return torch.stack(new, dim=1)


@torch.no_grad()
def continuation_logprobs(model, prompt_ids_1T: torch.Tensor, pixel_values_1NCP: torch.Tensor | None,
                          image_attention_mask_1TN: torch.Tensor | None, continuations: list[list[int]],
                          use_cache: bool = True) -> list[float]:
    """log P(continuation | prompt) for each continuation (summed over its tokens), for ranking
    classes or answers by likelihood. The prompt (vision included) runs once and its KV cache is
    forked for every continuation; continuation tokens reuse the prompt's last image-mask row.
    `use_cache=False` runs prompt + continuation whole each time (the reference)."""
    from flamingo_dist.models.flamingo import GenerationCache

    if prompt_ids_1T.shape[0] != 1:
        raise ValueError("continuation_logprobs scores one prompt at a time")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("continuation_logprobs: empty continuation")
    mask = image_attention_mask_1TN
    T = prompt_ids_1T.shape[1]
    prefix = GenerationCache() if use_cache else None
    first = None
    if prefix is not None:
        first = model.logits(prompt_ids_1T, pixel_values_1NCP, mask, cache=prefix)[0, -1].float().log_softmax(-1)
    out = []
    for cont in continuations:
        c = torch.tensor([cont], dtype=prompt_ids_1T.dtype, device=prompt_ids_1T.device)
        rows = None if mask is None else mask[:, -1:].expand(1, len(cont), mask.shape[-1])
        if prefix is not None:
            logp = first[cont[0]]
            if len(cont) > 1:
                more = model.logits(c[:, :-1], None, None if rows is None else rows[:, :-1], cache=prefix.fork())
                logp = logp + more[0].float().log_softmax(-1).gather(-1, c[0, 1:, None]).sum()
        else:
            ids = torch.cat([prompt_ids_1T, c], dim=1)
            full_mask = None if mask is None else torch.cat([mask, rows], dim=1)
            lp = model.logits(ids, pixel_values_1NCP, full_mask)[0, T - 1:-1].float().log_softmax(-1)
            logp = lp.gather(-1, c[0, :, None]).sum()
        out.append(float(logp))
    return out


@torch.no_grad()
def beam_search(model, input_ids_1T: torch.Tensor, pixel_values_1NCP: torch.Tensor | None,
                image_attention_mask_1TN: torch.Tensor | None, max_new_tokens: int, num_beams: int = 3,
                stop_token_ids: tuple[int, ...] = (), length_penalty: float = 1.0, use_cache: bool = True,
                banned_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """The best sequence's new tokens [1, <= max_new_tokens] for one prompt."""
    from flamingo_dist.models.flamingo import GenerationCache

    if input_ids_1T.shape[0] != 1 or num_beams < 1 or max_new_tokens < 1:
        raise ValueError("beam_search: one prompt, num_beams >= 1, max_new_tokens >= 1")
    dev = input_ids_1T.device
    mask = image_attention_mask_1TN
    row = mask[:, -1:] if mask is not None else None
    cache = GenerationCache() if use_cache else None
    logits = model.logits(input_ids_1T, pixel_values_1NCP, mask, cache=cache)[:, -1]
    beams = [[]]  # new tokens of each running beam
    scores = torch.zeros(1, device=dev, dtype=torch.float64)
    finished: list[tuple[float, list[int]]] = []
    stops, banned = set(stop_token_ids), list(banned_token_ids)
    for step in range(max_new_tokens):
        logp = logits.double().log_softmax(-1)
        if banned:
            logp[:, banned] = float("-inf")
        total = (scores[:, None] + logp).flatten()
        V = logp.shape[-1]
        top = total.topk(min(2 * num_beams, total.numel()))
        keep_rows, keep_tokens, keep_scores = [], [], []
        for rank, (score, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            b, tok = divmod(flat, V)
            if tok in stops:
                if rank < num_beams:  # only the step's best num_beams candidates may finish
                    finished.append((score / ((len(beams[b]) + 1) ** length_penalty), beams[b] + [tok]))
            elif len(keep_rows) < num_beams:
                keep_rows.append(b)
                keep_tokens.append(tok)
                keep_scores.append(score)
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        beams = [beams[b] + [t] for b, t in zip(keep_rows, keep_tokens)]
        scores = torch.tensor(keep_scores, device=dev, dtype=torch.float64)
        if step == max_new_tokens - 1 or not beams:
            break
        if len(finished) == num_beams:  # no running beam can still beat the worst finished one
            best_possible = scores.max().item() / ((len(beams[0])) ** length_penalty)
            if best_possible <= finished[-1][0]:
                break
        rows = torch.tensor(keep_rows, device=dev)
        new = torch.tensor(keep_tokens, device=dev, dtype=input_ids_1T.dtype)[:, None]
        if cache is not None:
            cache = cache.select(rows)
            logits = model.logits(new, None, None if row is None else row.expand(len(beams), 1, -1),
                                  cache=cache)[:, -1]
        else:
            ids = torch.cat([input_ids_1T.expand(len(beams), -1),
                             torch.tensor(beams, device=dev, dtype=input_ids_1T.dtype)], dim=1)
            m = None if mask is None else torch.cat([mask, row.expand(1, len(beams[0]), -1)], 1).expand(len(beams), -1, -1)
            pv = None if pixel_values_1NCP is None else pixel_values_1NCP.expand(len(beams), *pixel_values_1NCP.shape[1:])
            logits = model.logits(ids, pv, m)[:, -1]
    candidates = finished + [(s / (len(b) ** length_penalty), b) for s, b in zip(scores.tolist(), beams)]
    best = max(candidates, key=lambda c: c[0])[1]
    return torch.tensor([best], device=dev, dtype=input_ids_1T.dtype)
