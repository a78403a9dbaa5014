"""Does the model read its images? Top-1 next-token accuracy of words that only the image can
tell (the synthetic corpus' colour, shape and size words), on held-out batches, three ways:

- `true`: the batches as they are;
- `shuffled`: every image replaced by one from another row of the held-out set (so from another
  document): the rows with images are rotated by 1, 2, ... SHUFFLES places and the accuracies
  averaged, so the score does not hang on one pairing of the (few) held-out images (a rotation
  that would give every row its own images back is left out);
- `no`: the same pixels, but every token's image attention mask zeroed, so no token sees an
  image (the gated dense MLPs still run, as they do for text without images).

A model that uses its images scores high with `true` and near chance with `shuffled`; a model
that ignores them scores the same in all three. "Top-1" is over the whole vocabulary at the
positions whose target is one of a group's words.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flamingo_dist.data.layout import IGNORE_INDEX

CONDITIONS = ("true", "shuffled", "no")
SHUFFLES = 3


def word_ids(tokenizer, groups: dict[str, list[str]]) -> dict[str, list[int]]:
    """Each group's words as token ids; a word must be exactly one token (after a space, as it
    follows other words), or the accuracy would not be a word's."""
    out, bad = {}, []
    for group, words in groups.items():
        ids = []
        for w in words:
            toks = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            if len(toks) != 1 or toks[0] == tokenizer.unk_token_id:
                bad.append(f"{group}/{w} -> {toks}")
            else:
                ids.extend(toks)
        out[group] = ids
    if bad:
        raise ValueError("eval.attribute_words: each word must be one token of the tokenizer; not so: "
                         + ", ".join(bad))
    return out


def attribute_ids(cfg, tokenizer) -> dict[str, list[int]]:
    """A job's word groups as token ids: eval.attribute_words, else the synthetic corpus'
    attributes when training on it (alone or as a data.sources entry), else none."""
    from flamingo_dist.data.synthetic import ATTRIBUTES

    d, groups = cfg.data, cfg.eval.attribute_words
    synthetic = not d.sources and d.shards is None or any(s.get("synthetic") == "attributes" for s in d.sources)
    if not groups and synthetic:
        groups = {k: list(v) for k, v in ATTRIBUTES.items()}
    return word_ids(tokenizer, groups) if groups else {}


def shuffle_images(batches: list[dict], offset: int = 1) -> list[dict]:
    """Copies of `batches` in which each row's images come from the row `offset` places further
    among the rows that have images (over all batches, cyclically): row r's slot j gets that
    row's image j mod its count. Rows keep their own text, masks and image counts. A row gets
    its own images back only when offset is a multiple of the number of rows with images."""
    rows = [(b, r) for b, batch in enumerate(batches) for r in range(batch["pixel_values"].shape[0])
            if int(batch["num_images"][r]) > 0]
    if rows and offset % len(rows) == 0:
        raise ValueError(f"shuffling images by {offset} rows among {len(rows)} gives every row its own images")
    out = [dict(batch, pixel_values=batch["pixel_values"].clone()) for batch in batches]
    for k, (b, r) in enumerate(rows):
        nb, nr = rows[(k + offset) % len(rows)]
        n_own, n_next = int(batches[b]["num_images"][r]), int(batches[nb]["num_images"][nr])
        for j in range(n_own):
            out[b]["pixel_values"][r, j] = batches[nb]["pixel_values"][nr, j % n_next]
    return out


def hide_images(batches: list[dict]) -> list[dict]:
    return [dict(batch, image_attention_mask=torch.zeros_like(batch["image_attention_mask"])) for batch in batches]


@torch.no_grad()
def attribute_accuracy(logits_fn, batches: list[dict], groups: dict[str, list[int]], dp_group=None,
                       device: torch.device | str = "cpu") -> dict:
    """{"<condition>/<group>": accuracy}, {"count/<group>": targets} and {"majority/<group>": the
    share of the group's most frequent word among the targets, the best any prediction that
    ignores the image can do}, summed over the data-parallel group. `logits_fn(batch)` gives
    full-vocabulary logits [B, T, V]; it may be a collective (TP, ZeRO-3), so every rank calls it
    equally often: (2 + SHUFFLES) x its batches, also where a rotation would give rows their own
    images (or fewer than two rows have any), whose results are then not counted. A shuffled
    accuracy without any counted target is NaN."""
    names = list(groups)
    ids = {g: torch.tensor(groups[g]) for g in names}
    rows = sum(int((b["num_images"] > 0).sum()) for b in batches)
    shuffled = []  # (batch, counted)
    for k in range(1, SHUFFLES + 1):
        usable = rows >= 2 and k % rows != 0
        shuffled += [(b, usable) for b in (shuffle_images(batches, k) if usable else batches)]
    variants = {"true": [(b, True) for b in batches], "no": [(b, True) for b in hide_images(batches)],
                "shuffled": shuffled}
    sums = torch.zeros(len(CONDITIONS), len(names), 2, dtype=torch.float64)  # correct, total
    words = torch.zeros(len(names), max(len(v) for v in groups.values()), dtype=torch.float64)  # target counts
    for c, cond in enumerate(CONDITIONS):
        for batch, counted in variants[cond]:
            pred_BT = logits_fn(batch)[:, :-1].float().argmax(-1).cpu()
            if not counted:
                continue
            target_BT = batch["labels"][:, 1:]
            for g, name in enumerate(names):
                at = torch.isin(target_BT, ids[name]) & (target_BT != IGNORE_INDEX)
                sums[c, g, 0] += (pred_BT[at] == target_BT[at]).sum()
                sums[c, g, 1] += at.sum()
                if cond == "true":
                    for k, word in enumerate(ids[name].tolist()):
                        words[g, k] += (target_BT[at] == word).sum()
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        both = torch.cat([sums.flatten(), words.flatten()]).to(device)  # nccl reduces device tensors only
        dist.all_reduce(both, group=dp_group)
        sums, words = both[: sums.numel()].view_as(sums).cpu(), both[sums.numel():].view_as(words).cpu()
    out = {}
    for c, cond in enumerate(CONDITIONS):
        for g, name in enumerate(names):
            total = sums[c, g, 1].item()
            out[f"{cond}/{name}"] = sums[c, g, 0].item() / total if total else float("nan")
    for g, name in enumerate(names):
        out[f"count/{name}"] = int(sums[0, g, 1].item())
        out[f"majority/{name}"] = (words[g].max() / sums[0, g, 1].clamp(min=1)).item()
    return out
