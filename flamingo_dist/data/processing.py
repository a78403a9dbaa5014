"""Documents -> training sequences: decode and transform the media, tokenize in IDEFICS' layout
(data/layout.py), and pack several documents into one sequence.

Packing is greedy: documents go into the current sequence while its tokens (seq_len) and media
slots (max_images) last; the first one that does not fit starts the next sequence. A document
longer than a whole sequence is truncated (media past max_images are dropped with the text
before the next one). Packed documents never see each other's images: `image_attention_mask`
resets at every `</s>` (IDEFICS' rule). With `per_document_attention` (the default) each token
also attends only to earlier tokens of its own document and positions restart at 0 for every
document (`document_ids` / `position_ids` go to the model); without it a packed sequence is one
causal stream, exactly as IDEFICS' processor packs.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import torch

from flamingo_dist.data.formats import BadSample, Document, Media
from flamingo_dist.data.layout import (FAKE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, document_text, image_attention_mask,
                                       labelled_tokens, labels_for)

# open_clip / OpenAI CLIP normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def square_uint8(img, image_size: int) -> torch.Tensor:
    """An RGB PIL image squash-resized to [3, S, S] uint8 with the operations of transformers'
    `IdeficsImageProcessor` (torchvision backend: bicubic antialiased resize of the uint8 tensor).
    The loader ships these (4x less to copy between processes than floats) and the trainer
    normalises on the device."""
    import numpy as np
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    # the resize reads the HWC array through a permuted view (no CHW copy) and gives the same
    # bytes as torchvision's contiguous path (tests/test_data_formats.py)
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8))
    return F.resize(hwc.permute(2, 0, 1), [image_size, image_size], interpolation=InterpolationMode.BICUBIC,
                    antialias=True).contiguous()


def to_rgb(img):
    """A PIL image of any mode as 8-bit RGB. 16-bit (and 32-bit integer) greyscale, e.g. 16-bit
    PNGs, is scaled to 8 bits (PIL's own conversion clips it, so it comes out almost white)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


_CLIP_TENSORS: dict = {}  # device -> (mean, std) [3, 1, 1]: made once, not copied to the device every step


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> CLIP-normalised floats (rescale, then normalise, as the
    IDEFICS image processor does); float input is returned as it is (already normalised)."""
    if pixels.dtype != torch.uint8:
        return pixels
    if pixels.device not in _CLIP_TENSORS:
        _CLIP_TENSORS[pixels.device] = (torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None],
                                        torch.tensor(CLIP_STD, device=pixels.device)[:, None, None])
    mean, std = _CLIP_TENSORS[pixels.device]
    return ((pixels.float() / 255.0 - mean) / std).to(dtype)


# The keys of a micro-batch the training step moves to the device (the rest stays on the host).
MODEL_KEYS = ("input_ids", "labels", "pixel_values", "image_attention_mask", "position_ids", "document_ids",
              "media_slots")


def collate(rows: list[dict]) -> dict:
    """Rows -> one micro-batch, with what the training step would otherwise read back from the
    device, computed here in the loader:

    - `media_slots` [M]: the flat indices (row * max_images + slot) of the media slots some token
      attends to, at least one (slot 0 of an imageless batch: every rank then calls the vision
      encoder, which ZeRO-3 needs); the model encodes only these (models/flamingo.py).
    - `_host`: Python numbers of the batch: `labelled_tokens` (next-token targets), `images`,
      `documents`.
    - `document_ids` only when some row holds more than one document: with one document per row
      per-document attention is plain causal attention (SDPA's `is_causal`, no mask; padding
      after the document attends to it, but nothing attends to padding and it has no label).
    """
    batch = torch.utils.data.default_collate(rows)
    used = batch["image_attention_mask"].bool().any(dim=1).reshape(-1).nonzero().squeeze(1)
    batch["media_slots"] = used if len(used) else torch.zeros(1, dtype=torch.long)
    if "document_ids" in batch and int(batch["num_documents"].max()) <= 1:
        del batch["document_ids"]
    batch["_host"] = {"labelled_tokens": labelled_tokens(batch["labels"]), "images": int(batch["num_images"].sum()),
                      "documents": int(batch["num_documents"].sum())}
    return batch


def image_transform(image_size: int):
    """PIL image -> normalised [3, S, S] floats (evaluation and export parity; see square_uint8),
    so an exported processor reproduces our pixels (to float rounding; tests/test_export_tool.py)."""

    def transform(img) -> torch.Tensor:
        return normalize_pixels(square_uint8(to_rgb(img), image_size))

    return transform


@dataclass
class Limits:
    max_image_bytes: int = 32 << 20
    max_image_pixels: int = 64 << 20
    jpeg_draft: bool = True


# What decoding untrusted bytes may raise besides OSError (PIL's usual one): PIL's plugins parse
# headers with struct and index arithmetic, so a cut or flipped file can surface as any of these.
# Each becomes a counted undecodable_image; nothing else is caught.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                 struct.error, RuntimeError)


def open_image(data: bytes, size: int, limits: Limits):
    """The decoded PIL image of encoded bytes (any mode), or BadSample. The pixel limit is ours
    (`Limits.max_image_pixels`, checked from the header before decoding); PIL's own
    decompression-bomb limit is lifted so it neither overrides ours nor turns an image over it
    into an "undecodable" one. JPEGs are decoded in draft mode (the decoder's own 1/2..1/8
    scaling) when that still leaves at least `size` pixels per side."""
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise BadSample("image_too_large", f"{len(data)} bytes > data.max_image_bytes ({limits.max_image_bytes})")
    Image.MAX_IMAGE_PIXELS = None  # ours is checked below, from the header
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise BadSample("image_too_large", f"{w}x{h} pixels > data.max_image_pixels ({limits.max_image_pixels})")
        if limits.jpeg_draft and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()
        return img
    except DECODE_ERRORS as e:
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None


class MediaDecoder:
    """Media -> uint8 pixels: an image [3, S, S], a video [frames, 3, S, S] (frames spread evenly
    over the clip, repeated when it has fewer); BadSample when it cannot be used."""

    def __init__(self, image_size: int, frames: int = 0, limits: Limits | None = None):
        self.image_size, self.frames, self.limits = image_size, frames, limits or Limits()

    def transform(self, img) -> torch.Tensor:
        try:  # a decoder can still fail on the pixels it loads lazily (modes, palettes)
            return square_uint8(to_rgb(img), self.image_size)
        except DECODE_ERRORS as e:
            raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None

    def __call__(self, media: Media) -> torch.Tensor:
        if not media.video:
            return self.transform(open_image(media.frames[0], self.image_size, self.limits))
        frames = None
        if len(media.frames) == 1:  # an animated container
            from PIL import ImageSequence

            img = open_image(media.frames[0], self.image_size, self.limits)
            try:
                frames = [self.transform(f) for f in ImageSequence.Iterator(img)]
            except DECODE_ERRORS as e:
                raise BadSample("undecodable_image", f"{media.name}: {type(e).__name__}: {e}") from None
        n = len(frames) if frames is not None else len(media.frames)
        count = self.frames or n
        picks = [round(i * (n - 1) / max(1, count - 1)) for i in range(count)]
        if frames is None:
            decoded = {p: self.transform(open_image(media.frames[p], self.image_size, self.limits)) for p in set(picks)}
            return torch.stack([decoded[p] for p in picks])
        return torch.stack([frames[p] for p in picks])


def decode_document_media(doc: Document, decode: MediaDecoder, max_media: int | None = None):
    """(items, pixels, failures): the document's items with undecodable media left out (and
    those past `max_media`, with the text after them up to the next media), the decoded media,
    and the BadSample of each media left out (those parsing already left out first). A document
    left with no media is bad, under the reason of its first failure."""
    items, pixels, failures = [], [], list(doc.dropped)
    for item in doc.items:
        if isinstance(item, Media):
            if max_media is not None and len(pixels) == max_media:
                break  # the text up to the next media stays
            try:
                pixels.append(decode(item))
            except BadSample as e:
                failures.append(e)
                continue
        items.append(item)
    if not pixels:
        raise failures[0] if failures else BadSample("no_image", doc.key)
    return items, pixels, failures


@dataclass
class Encoded:
    """One document, tokenized: ids (already truncated), one pixel tensor per media slot kept."""

    ids: list[int]
    pixels: list[torch.Tensor]
    dropped: tuple[str, ...] = ()  # the reason of each image left out
    key: str = ""


class Processor:
    """Document -> Encoded (decode, transform, tokenize) and Encoded list -> packed batch."""

    def __init__(self, tokenizer, seq_len: int, max_images: int, image_size: int, frames: int = 0,
                 limits: Limits | None = None, per_document_attention: bool = True):
        self.tok, self.seq_len, self.max_images, self.image_size = tokenizer, seq_len, max_images, image_size
        self.frames = frames  # > 0: a video source, every media slot holds this many frames
        self.decode = MediaDecoder(image_size, frames, limits)
        self.per_document_attention = per_document_attention
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.fake_id = tokenizer.convert_tokens_to_ids(FAKE_TOKEN)

    def media_shape(self) -> tuple[int, ...]:
        side = self.image_size
        return (self.frames, 3, side, side) if self.frames else (3, side, side)

    def encode(self, doc: Document) -> Encoded:
        """Decode the media (an undecodable one is dropped; a document left with none is bad,
        under the reason of its first failure), then tokenize and truncate."""
        items, pixels, failures = decode_document_media(doc, self.decode, self.max_images)
        text, _ = document_text(items, self.tok.bos_token, self.tok.eos_token)
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.seq_len]
        seen = sum(1 for t in ids if t == self.image_id)  # media that survived truncation
        return Encoded(ids, pixels[:seen], dropped=tuple(f.reason for f in failures), key=doc.key)

    def fits(self, packed: list[Encoded], enc: Encoded) -> bool:
        if not packed:
            return True
        return (sum(len(e.ids) for e in packed) + len(enc.ids) <= self.seq_len
                and sum(len(e.pixels) for e in packed) + len(enc.pixels) <= self.max_images)

    def sequence(self, packed: list[Encoded]) -> dict:
        """One training row from the documents packed into it."""
        T, N = self.seq_len, self.max_images
        ids = [t for e in packed for t in e.ids]
        n = len(ids)
        input_ids = torch.tensor(ids + [self.tok.pad_token_id] * (T - n))
        attn = (torch.arange(T) < n).long()
        doc_ids = torch.zeros(T, dtype=torch.long)
        positions = torch.arange(T)
        labels = labels_for(input_ids[None], attn[None], self.image_id, self.fake_id)[0]
        at = 0
        for d, e in enumerate(packed, start=1):
            doc_ids[at: at + len(e.ids)] = d
            if self.per_document_attention:
                positions[at: at + len(e.ids)] = torch.arange(len(e.ids))
                labels[at] = IGNORE_INDEX  # a document's first token is not predicted from another's
            at += len(e.ids)
        pv = torch.zeros(N, *self.media_shape(), dtype=torch.uint8)
        media = [p for e in packed for p in e.pixels]
        for k, p in enumerate(media):
            pv[k] = p
        mask = image_attention_mask(input_ids[None], self.image_id, self.tok.eos_token_id, N)[0] * attn[:, None]
        row = {"input_ids": input_ids, "labels": labels, "attention_mask": attn, "pixel_values": pv,
               "image_attention_mask": mask, "position_ids": positions, "num_images": torch.tensor(len(media)),
               "num_documents": torch.tensor(len(packed))}
        if self.per_document_attention:
            row["document_ids"] = doc_ids
        return row
