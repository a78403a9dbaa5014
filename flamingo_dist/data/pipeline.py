"""Minimal interleaved-document pipeline: webdataset shards -> IDEFICS token layout -> batches.

The documents form one global stream (shard order reshuffled per epoch from the seed). It is cut
into micro-batch slots of micro_batch_size documents, dealt round-robin to the data-parallel
ranks (TP ranks of one group get the same batches), and a rank's slots round-robin to its loader
workers in the order the DataLoader asks them. So after k micro-batches on every rank exactly the
first k * dp_size * micro_batch_size documents are consumed, whatever the number of workers: the
data position is that one number, `start` resumes there, and it means the same thing at any
data-parallel size (a resume at another layout continues the same global stream). Documents longer than seq_len are truncated,
shorter ones padded on the right; documents beyond max_images keep their first max_images images
and the text before the next one. (Packing, mixtures, exact resume and bad-sample accounting are
the data issue's.)
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
from typing import Iterator

import torch

from flamingo_dist.data.layout import FAKE_TOKEN, IMAGE_TOKEN, document_text, image_attention_mask, labels_for

# open_clip / OpenAI CLIP normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGE = object()  # an image's place in a document's item list


def list_shards(spec: str) -> list[str]:
    """A directory of .tar files, a glob, or webdataset brace notation -> sorted shard paths."""
    import braceexpand

    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        paths = sorted(p for pat in braceexpand.braceexpand(spec) for p in glob.glob(pat))
    if not paths:
        raise FileNotFoundError(f"data.shards: no .tar shards match {spec!r}")
    return paths


def image_transform(image_size: int):
    """Squash-resize to a square and CLIP-normalise, with the operations of transformers'
    `IdeficsImageProcessor` (torchvision backend: bicubic antialiased resize of the uint8 tensor,
    then rescale and normalise), so an exported processor reproduces our pixels (to float
    rounding; tests/test_export_tool.py)."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]

    def transform(img) -> torch.Tensor:
        pixels = F.resize(F.pil_to_tensor(img.convert("RGB")), [image_size, image_size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
        return (pixels.float() / 255.0 - mean) / std

    return transform


class InterleavedDataset(torch.utils.data.IterableDataset):
    """Endless stream of collated micro-batches for one data-parallel rank, from global document
    `start` on."""

    def __init__(self, shards: list[str], tokenizer, seq_len: int, max_images: int, image_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, start: int = 0):
        self.shards, self.tok = shards, tokenizer
        self.micro_batch_size, self.start = micro_batch_size, start
        self.seq_len, self.max_images = seq_len, max_images
        self.image_size = image_size
        self.transform = image_transform(image_size)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.fake_id = tokenizer.convert_tokens_to_ids(FAKE_TOKEN)

    def _documents(self, epoch: int) -> Iterator[dict]:
        import webdataset as wds

        order = list(self.shards)
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        for path in order:
            for sample in wds.tarfile_samples([{"url": path}]):
                yield sample

    def _stream(self) -> Iterator[tuple[int, dict]]:
        """(global document index, raw sample) over epochs, forever."""
        index, epoch = 0, 0
        while True:
            for sample in self._documents(epoch):
                yield index, sample
                index += 1
            epoch += 1
            if index == 0:
                raise ValueError(f"data: the shards hold no documents ({self.shards[:3]}...)")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        mb, batch = self.micro_batch_size, []
        for index, sample in self._stream():
            if index < self.start:
                continue
            slot = (index - self.start) // mb
            local_batch, owner = divmod(slot, self.dp_size)  # the owner's local_batch-th micro-batch
            if owner == self.dp_rank and local_batch % nworkers == wid:
                batch.append(self.process(sample))
                if len(batch) == mb:
                    yield torch.utils.data.default_collate(batch)
                    batch = []

    def process(self, sample: dict) -> dict:
        from PIL import Image

        meta = json.loads(sample["json"])
        items, pixels = [], []
        for text, image in zip(meta["texts"], meta["images"]):
            if image is not None:
                if len(pixels) == self.max_images:
                    break
                img = Image.open(io.BytesIO(sample[image])).convert("RGB")
                pixels.append(self.transform(img))
                items.append(_IMAGE)
            elif text:
                items.append(text)
        text, _ = document_text(items, self.tok.bos_token, self.tok.eos_token)
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.seq_len]
        n = len(ids)
        ids = ids + [self.tok.pad_token_id] * (self.seq_len - n)
        input_ids = torch.tensor(ids)
        attn = (torch.arange(self.seq_len) < n).long()
        num_seen = int((input_ids[:n] == self.image_id).sum())  # images that survived truncation
        pv = torch.zeros(self.max_images, 3, self.image_size, self.image_size)
        for k in range(min(num_seen, len(pixels))):
            pv[k] = pixels[k]
        mask = image_attention_mask(input_ids[None], self.image_id, self.tok.eos_token_id, self.max_images)[0]
        mask = mask * attn[:, None]
        return {"input_ids": input_ids, "labels": labels_for(input_ids[None], attn[None], self.image_id, self.fake_id)[0],
                "attention_mask": attn, "pixel_values": pv, "image_attention_mask": mask,
                "num_images": torch.tensor(num_seen)}


def build_dataloader(shards: list[str], tokenizer, seq_len: int, max_images: int, image_size: int,
                     micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, num_workers: int = 0,
                     start: int = 0):
    ds = InterleavedDataset(shards, tokenizer, seq_len, max_images, image_size, micro_batch_size, dp_rank, dp_size,
                            seed, start)
    from flamingo_dist.slurm import ignore_stop_signals

    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
