"""Token layout, labels and image attention mask of one interleaved document, exactly as
transformers' `IdeficsProcessor` builds them (`add_eos_token=True`), so an exported model sees at
inference the layout it was trained on:

    <s> text <fake><image><fake> text <fake><image><image><fake> ... </s>

(consecutive images share one fake token). `image_attention_mask[t, n] = 1` when token t's most
recent preceding `<image>` is image n of its document; tokens before the first image and after
`</s>` see none (IDEFICS' `image_attention_mask_for_packed_input_ids` +
`incremental_to_binary_attention_mask`).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

Item = Union[str, object]  # text, or an image placeholder (anything that is not a str)


def document_text(items: Sequence[Item], bos: str, eos: str) -> tuple[str, int]:
    """The prompt string for a document and its number of images."""
    text, last_was_image, n_images = bos, False, 0
    for item in items:
        if isinstance(item, str):
            text += item.strip(" ")
            last_was_image = False
        else:
            text += (IMAGE_TOKEN + FAKE_TOKEN) if last_was_image else (FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN)
            last_was_image = True
            n_images += 1
    return text + eos, n_images


def image_attention_mask(input_ids_BT: torch.Tensor, image_token_id: int, eos_token_id: int,
                         num_images: int) -> torch.Tensor:
    """[B, T] ids -> [B, T, num_images] 0/1 long mask (IDEFICS semantics, vectorised)."""
    is_img = input_ids_BT == image_token_id
    count_BT = is_img.long().cumsum(-1) - 1  # index of the most recent image, -1 before the first
    # After an </s>, no image is seen until the next <image>: the </s> itself still sees it.
    is_eos = (input_ids_BT == eos_token_id).long()
    eos_before_BT = torch.cumsum(is_eos, -1) - is_eos  # </s> strictly before t
    img_pos = torch.where(is_img, torch.arange(input_ids_BT.shape[1]).expand_as(input_ids_BT),
                          torch.full_like(input_ids_BT, -1))
    last_img_pos = torch.cummax(img_pos, dim=-1).values
    eos_before_last_img = torch.zeros_like(eos_before_BT)
    valid = last_img_pos >= 0
    eos_before_last_img[valid] = torch.gather(eos_before_BT, 1, last_img_pos.clamp(min=0))[valid]
    # eos counted up to and including the last image is eos_before(last_img); any eos after it
    # (strictly before t) cuts t off.
    cut = eos_before_BT > eos_before_last_img
    count_BT = torch.where(cut | ~valid, torch.full_like(count_BT, -1), count_BT)
    count_BT = torch.where(count_BT >= num_images, torch.full_like(count_BT, -1), count_BT)
    mask = torch.nn.functional.one_hot(count_BT.clamp(min=0), num_classes=num_images)
    return mask * (count_BT >= 0)[..., None]


def labels_for(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, image_token_id: int,
               fake_token_id: int) -> torch.Tensor:
    """-100 for padding, `<image>` and `<fake_token_around_image>`; `</s>` is predicted."""
    ignore = (attention_mask_BT == 0) | (input_ids_BT == image_token_id) | (input_ids_BT == fake_token_id)
    return input_ids_BT.masked_fill(ignore, IGNORE_INDEX)


def labelled_tokens(labels_BT: torch.Tensor) -> int:
    """How many next-token targets a batch has (the loss's denominator: labels shifted by one)."""
    return int((labels_BT[:, 1:] != IGNORE_INDEX).sum())
