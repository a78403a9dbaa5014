"""Greedy decoding for our model with the semantics of transformers' IDEFICS generation: each new
token reuses the last prompt row of the image attention mask (it sees the images the last prompt
token sees), a row that produced a stop token is padded from then on, and decoding ends when
every row has stopped or after max_new_tokens.

This is the reference decoder: it recomputes the whole sequence (vision encoder included) for
every new token. Works at any TP size (every TP rank of a group computes the same tokens).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, input_ids_BT: torch.Tensor, pixel_values_BNCP: torch.Tensor | None,
           image_attention_mask_BTN: torch.Tensor | None, max_new_tokens: int,
           stop_token_ids: tuple[int, ...] = (), pad_token_id: int = 0) -> torch.Tensor:
    """The new tokens [B, <= max_new_tokens] (prompts must not be padded)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask = input_ids_BT, image_attention_mask_BTN
    stops = torch.tensor(sorted(stop_token_ids), dtype=ids.dtype, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        next_B = model.logits(ids, pixel_values_BNCP, mask)[:, -1].argmax(dim=-1)
        next_B = next_B.masked_fill(done, pad_token_id)
        done = done | torch.isin(next_B, stops)
        ids = torch.cat([ids, next_B[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask[:, -1:]], dim=1)
        if bool(done.all()):
            break
    return ids[:, input_ids_BT.shape[1]:]
