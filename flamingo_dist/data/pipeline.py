"""Sources -> deterministic, exactly resumable micro-batch streams.

How the data is dealt (one source; every source the same way, independently):

- The source's shards are split among S *streams* (`data.streams`): stream k owns shards k, k+S,
  k+2S, ... Each stream reads its shards in an order reshuffled every pass from the seed, packs
  documents into micro-batches, and loops forever (so no rank ever runs dry: every rank gets a
  batch for every step).
- Micro-batch *slots* 0, 1, 2, ... of the source form one global sequence; slot g comes from
  stream g mod S, slots are dealt round-robin to the data-parallel ranks (rank r takes slots
  r, r+dp, ...), and a rank's slots round-robin to its loader workers (the order in which the
  DataLoader asks them). This needs dp x workers to divide S: then each worker process owns whole
  streams, and no two processes ever read the same shard.
- The data position is the number of slots consumed (the same on every rank) plus each stream's
  state after its last consumed batch: (pass, shard in that pass's order, sample index in the
  shard) of the first document not yet in a batch, and its counters. Every batch carries its
  stream's state; the trainer keeps the latest consumed one per stream and the checkpoint stores
  them all. Resuming builds each stream at its state (the tar members before the sample are
  seeked over, not decoded), so the resumed run sees exactly the samples the uninterrupted run
  would have seen. A resume at another data-parallel size or worker count continues the same
  global sequence as long as dp x workers still divides S; otherwise it is refused with the
  numbers (set `data.streams` to a multiple of every layout you plan to use).

Bad samples are skipped and counted per reason (formats.REASONS) in the stream's counters, and so
are the images left out of documents that were kept (`images_dropped/<reason>`). When a shard's
skip rate passes `data.max_skip_rate` (judged once `data.skip_rate_min_samples` samples of that
shard were read, or when a smaller shard ends) the batch carries an error naming the shard, and
the trainer stops the run with it.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from flamingo_dist.data.formats import REASONS, BadSample, parse, read_shard
from flamingo_dist.data.processing import Encoded, Processor, collate

COUNTERS = (("samples", "documents", "images_dropped") + tuple(f"skipped/{r}" for r in REASONS)
            + tuple(f"images_dropped/{r}" for r in REASONS))


def shard_set_digest(shards: list[str]) -> str:
    """Identifies a source's shard list (names, in order) in checkpoints."""
    return hashlib.sha256("\n".join(os.path.basename(p) for p in shards).encode()).hexdigest()[:16]


@dataclass
class Source:
    """One data source, resolved: its shard paths and how to read and weigh them."""

    name: str
    format: str
    shards: list[str]
    weight: float = 1.0
    micro_batch_size: int = 1
    min_sim: float = 0.24
    image_after_text_p: float = 0.5


def initial_state() -> dict:
    return {"epoch": 0, "shard": 0, "offset": 0, "shard_samples": 0, "shard_skipped": 0,
            "counts": {c: 0 for c in COUNTERS}}


class Stream:
    """Stream k of S of one source: its shards, read and packed into micro-batches, from `state`."""

    def __init__(self, source: Source, processor: Processor, k: int, num_streams: int, seed: int,
                 state: Optional[dict] = None, pack: bool = True, max_skip_rate: float = 1.0,
                 skip_rate_min_samples: int = 100):
        self.source, self.proc, self.k, self.seed, self.pack = source, processor, k, seed, pack
        self.shards = source.shards[k::num_streams]
        if not self.shards:
            raise ValueError(f"data source {source.name!r}: stream {k} of {num_streams} has no shard "
                             f"({len(source.shards)} shards); use fewer data.streams or more shards")
        self.max_skip_rate, self.min_samples = max_skip_rate, skip_rate_min_samples
        self.state = _copy(state or initial_state())
        for c in COUNTERS:  # a state saved before a counter existed starts it at 0
            self.state["counts"].setdefault(c, 0)
        self.pending: Optional[tuple[dict, Encoded]] = None  # (state before it, document)
        self.error: Optional[str] = None
        self.pass_counts: list[dict] = []  # the counters at the end of each pass this object finished
        self._docs = self._documents()

    def order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.source.name}/{self.k}/{epoch}").shuffle(order)
        return order

    def _count(self, reason: Optional[str], path: str) -> None:
        st = self.state
        st["counts"]["samples"] += 1
        st["shard_samples"] += 1
        if reason is not None:
            st["counts"][f"skipped/{reason}"] += 1
            st["shard_skipped"] += 1
        if st["shard_samples"] >= self.min_samples:
            self._judge(path, "the first ")

    def _judge(self, path: str, which: str) -> None:
        n, bad = self.state["shard_samples"], self.state["shard_skipped"]
        if self.error is None and n > 0 and bad > self.max_skip_rate * n:
            self.error = (f"data source {self.source.name!r}: {bad} of {which}{n} samples of shard {path} were "
                          f"bad (over data.max_skip_rate = {self.max_skip_rate}); run tools/check_shards.py on it")

    def _documents(self) -> Iterator[tuple[dict, Encoded]]:
        """(state before the document, document) forever; bad samples are counted and skipped."""
        st, src, good_in_pass = self.state, self.source, 0
        while True:
            whole_pass = st["shard"] == 0 and st["offset"] == 0
            order = self.order(st["epoch"])
            while st["shard"] < len(order):
                path = order[st["shard"]]
                for index, sample in read_shard(path, skip=st["offset"]):
                    before = _copy(st)
                    st["offset"] = index + 1
                    if isinstance(sample, BadSample):
                        self._count(sample.reason, path)
                        continue
                    try:
                        rng = random.Random(f"{self.seed}/{src.name}/{os.path.basename(path)}/{index}/{st['epoch']}")
                        doc = parse(src.format, sample, rng, src.min_sim, src.image_after_text_p)
                        enc = self.proc.encode(doc)
                    except BadSample as e:
                        self._count(e.reason, path)
                        continue
                    self._count(None, path)
                    st["counts"]["documents"] += 1
                    st["counts"]["images_dropped"] += len(enc.dropped)
                    for reason in enc.dropped:
                        st["counts"][f"images_dropped/{reason}"] += 1
                    good_in_pass += 1
                    yield before, enc
                if 0 < st["shard_samples"] < self.min_samples:  # a small shard is judged when it ends
                    self._judge(path, "all ")
                st["shard"] += 1
                st["offset"] = st["shard_samples"] = st["shard_skipped"] = 0
            if good_in_pass == 0 and whole_pass:
                raise ValueError(f"data source {src.name!r}: a whole pass over stream {self.k}'s shards "
                                 f"({', '.join(self.shards[:4])}{' ...' if len(self.shards) > 4 else ''}) gave no "
                                 "usable document; check them with tools/check_shards.py")
            self.pass_counts.append(dict(st["counts"]))
            st["epoch"] += 1
            st["shard"] = 0
            good_in_pass = 0

    def next_batch(self) -> tuple[dict, dict]:
        """(collated micro-batch, this stream's state after it)."""
        rows = []
        while len(rows) < self.source.micro_batch_size:
            packed: list[Encoded] = []
            while True:
                if self.pending is None:
                    self.pending = next(self._docs)
                before, enc = self.pending
                if not self.proc.fits(packed, enc) or (packed and not self.pack):
                    break
                packed.append(enc)
                self.pending = None
            rows.append(self.proc.sequence(packed))
        # the first document not in this batch is where a resume starts reading again
        state = _copy(self.pending[0]) if self.pending is not None else _copy(self.state)
        return collate(rows), state


def _copy(state: dict) -> dict:
    return {**state, "counts": dict(state["counts"])}


class SourceDataset(torch.utils.data.IterableDataset):
    """One data-parallel rank's endless micro-batches of one source (see the module docstring),
    from global slot `start` on; `states` are the streams' saved states."""

    def __init__(self, source: Source, processor: Processor, num_streams: int, dp_rank: int, dp_size: int,
                 seed: int, start: int = 0, states: Optional[dict] = None, pack: bool = True,
                 max_skip_rate: float = 1.0, skip_rate_min_samples: int = 100):
        self.source, self.proc, self.num_streams = source, processor, num_streams
        self.dp_rank, self.dp_size, self.seed, self.start = dp_rank, dp_size, seed, start
        self.states = {int(k): v for k, v in (states or {}).items()}
        self.pack, self.max_skip_rate, self.min_samples = pack, max_skip_rate, skip_rate_min_samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if self.num_streams % (nworkers * self.dp_size):
            raise ValueError(f"data.streams ({self.num_streams}) must be a multiple of data-parallel size x loader "
                             f"workers ({self.dp_size} x {nworkers})")
        streams: dict[int, Stream] = {}
        j = wid
        while True:
            slot = self.start + j * self.dp_size + self.dp_rank
            k = slot % self.num_streams
            if k not in streams:
                streams[k] = Stream(self.source, self.proc, k, self.num_streams, self.seed, self.states.get(k),
                                    self.pack, self.max_skip_rate, self.min_samples)
            batch, state = streams[k].next_batch()
            batch["_data"] = {"stream": k, "state": state, "error": streams[k].error}
            yield batch
            j += nworkers


def build_loader(dataset: SourceDataset, num_workers: int, worker_init_fn=None, pin_memory: bool = False):
    """`worker_init_fn` runs first in each loader worker (the trainer's makes them ignore SLURM's
    stop signal, which only the main process handles). `pin_memory` (training on a GPU): batches
    arrive in page-locked memory, so their copies to the device do not block the host."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, worker_init_fn=worker_init_fn,
                                       prefetch_factor=2 if num_workers > 0 else None, pin_memory=pin_memory)
