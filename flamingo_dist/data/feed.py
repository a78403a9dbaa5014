"""What the trainer draws data from: one loader per source (data/pipeline.py), the data position
that checkpoints store, the bad-sample counters, and the validation batches.

The data state (in trainer.json under "data"): {"slots": micro-batch slots consumed per source
(the same for every source and on every rank), "streams": S, "sources": {name: {"shards":
digest of its shard list, "states": {stream: state after its last consumed batch}}}}.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist

from flamingo_dist.config.schema import ConfigError, JobConfig
from flamingo_dist.data.pipeline import (COUNTERS, Source, SourceDataset, Stream, build_loader, initial_state,
                                         shard_set_digest)
from flamingo_dist.data.processing import Limits, Processor


class DataStateError(ConfigError):
    """A saved data position that cannot be continued exactly here; the message says why."""


def processor_for(cfg: JobConfig, tokenizer, source: Source) -> Processor:
    d = cfg.data
    return Processor(tokenizer, d.seq_len, d.max_images, d.image_size,
                     frames=d.frames_per_video if source.format == "video" else 0,
                     limits=Limits(d.max_image_bytes, d.max_image_pixels, d.jpeg_draft),
                     per_document_attention=d.per_document_attention)


def resolve_streams(cfg: JobConfig, dp_size: int, saved: Optional[dict]) -> int:
    """The number of streams: the checkpoint's when resuming, else data.streams or dp x workers;
    refused when this layout cannot continue it exactly."""
    d = cfg.data
    per = dp_size * max(1, d.num_workers)
    if saved is not None:
        n = saved["streams"]
        if d.streams and d.streams != n:
            raise DataStateError(f"data.streams is {d.streams} but the checkpoint's data was dealt to {n} streams; "
                                 f"resume with data.streams={n} (or 0)")
    else:
        n = d.streams or per
    if n % per:
        divisors = [w for w in range(1, n + 1) if n % (dp_size * w) == 0]
        hint = (f"use data.num_workers in {divisors}" if divisors else
                f"this data-parallel size ({dp_size}) does not divide {n}")
        raise DataStateError(f"the data is dealt to {n} streams, which data-parallel size x loader workers "
                             f"({dp_size} x {max(1, d.num_workers)}) must divide for an exact continuation; {hint}")
    return n


class DataFeed:
    def __init__(self, cfg: JobConfig, sources: list[Source], tokenizer, dp_rank: int, dp_size: int,
                 dp_group, device, saved: Optional[dict] = None, worker_init_fn=None):
        self.cfg, self.sources, self.tok = cfg, sources, tokenizer
        self.dp_rank, self.dp_size, self.dp_group, self.device = dp_rank, dp_size, dp_group, device
        self.num_streams = resolve_streams(cfg, dp_size, saved)
        self.start = 0
        self.states: dict[str, dict[int, dict]] = {s.name: {} for s in sources}
        if saved is not None:
            self.start = saved["slots"]
            for s in sources:
                entry = saved["sources"].get(s.name)
                if entry is None:
                    raise DataStateError(f"data source {s.name!r} is not in the checkpoint's data state (it has "
                                         f"{sorted(saved['sources'])}); sources cannot change within a run")
                if entry["shards"] != shard_set_digest(s.shards):
                    raise DataStateError(f"data source {s.name!r}: its shard list differs from the checkpoint's "
                                         f"({len(s.shards)} shards now); the saved position would point elsewhere")
                self.states[s.name] = {int(k): v for k, v in entry["states"].items()}
        for s in sources:
            if len(s.shards) < self.num_streams:
                raise DataStateError(f"data source {s.name!r} has {len(s.shards)} shards but the data is dealt to "
                                     f"{self.num_streams} streams (data-parallel size x loader workers, or "
                                     "data.streams): every stream needs a shard; split the shards finer")
        d = cfg.data
        self.loaders = {}
        for s in sources:
            ds = SourceDataset(s, processor_for(cfg, tokenizer, s), self.num_streams, dp_rank, dp_size,
                               cfg.train.seed, self.start, self.states[s.name], d.pack, d.max_skip_rate,
                               d.skip_rate_min_samples)
            self.loaders[s.name] = iter(build_loader(ds, d.num_workers, worker_init_fn,
                                                     pin_memory=torch.device(device).type == "cuda"))
        self.drawn = 0  # micro-batches drawn per source by this process
        self.error: Optional[str] = None

    def close(self) -> None:
        """Shut the loader workers down (each is told to stop and joined); idempotent."""
        for it in self.loaders.values():
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # ------------------------------------------------------------------ drawing
    def next(self, source: Source) -> dict:
        batch = next(self.loaders[source.name])
        info = batch.pop("_data")
        self.states[source.name][info["stream"]] = info["state"]
        if info["error"] and self.error is None:
            self.error = info["error"]
        return batch

    def step_batches(self, accum: int) -> list[tuple[Source, dict]]:
        """One optimizer step's micro-batches: `accum` of every source."""
        out = [(s, self.next(s)) for _ in range(accum) for s in self.sources]
        self.drawn += accum
        return out

    def slots(self) -> int:
        """Micro-batch slots of each source consumed globally (the same on every rank)."""
        return self.start + self.drawn * self.dp_size

    # ------------------------------------------------------------------ state
    def own_states(self) -> dict[str, dict[int, dict]]:
        """The states of the streams this data-parallel rank reads (stream k goes to rank k mod dp)."""
        return {name: {k: st for k, st in states.items() if k % self.dp_size == self.dp_rank}
                for name, states in self.states.items()}

    def state_dict(self) -> dict:
        """Collective (world): every stream's state, each from the rank that owns it."""
        own = self.own_states()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, own)
        merged: dict[str, dict] = {s.name: {} for s in self.sources}
        for part in gathered:
            for name, states in part.items():
                merged[name].update({str(k): v for k, v in states.items()})
        return {"slots": self.slots(), "streams": self.num_streams,
                "sources": {s.name: {"shards": shard_set_digest(s.shards), "states": merged[s.name]}
                            for s in self.sources}}

    def counters(self) -> dict[str, float]:
        """Collective (data-parallel group): each source's cumulative counters over all its
        streams (samples read, documents used, images dropped, samples skipped per reason)."""
        sums = [[0.0] * len(COUNTERS) for _ in self.sources]
        for i, s in enumerate(self.sources):
            for k, st in self.states[s.name].items():  # .get: a checkpoint older than a counter lacks it
                if k % self.dp_size == self.dp_rank:
                    for j, c in enumerate(COUNTERS):
                        sums[i][j] += float(st["counts"].get(c, 0))
        if self.dp_size > 1:
            vec = torch.tensor(sums, dtype=torch.float64, device=self.device)
            dist.all_reduce(vec, group=self.dp_group)
            sums = vec.tolist()  # one read
        return {f"data/{s.name}/{c}": sums[i][j] for i, s in enumerate(self.sources) for j, c in enumerate(COUNTERS)}

    # ------------------------------------------------------------------ validation
    def validation_batches(self, source: Source, val_shards: list[str]):
        """This rank's validation micro-batches of a source: the same ones at every evaluation.
        With at least dp shards each rank reads its own; otherwise every rank reads the one
        stream and keeps every dp-th batch."""
        d = self.cfg.data
        val = dataclasses.replace(source, shards=val_shards)
        proc = processor_for(self.cfg, self.tok, source)
        if len(val_shards) >= self.dp_size:
            stream = Stream(val, proc, self.dp_rank, self.dp_size, self.cfg.train.seed, initial_state(), d.pack)
            return [stream.next_batch()[0] for _ in range(d.val_batches)]
        stream = Stream(val, proc, 0, 1, self.cfg.train.seed, initial_state(), d.pack)
        out = []
        for j in range(d.val_batches * self.dp_size):
            batch = stream.next_batch()[0]
            if j % self.dp_size == self.dp_rank:
                out.append(batch)
        return out


def resolve_sources(cfg: JobConfig, synthetic_dir: Optional[str] = None, synthetic_val_dir: Optional[str] = None,
                    synthetic_sources: Optional[dict[str, tuple[str, Optional[str]]]] = None
                    ) -> tuple[list[Source], dict[str, list[str]]]:
    """(training sources, {source name: validation shard paths}); shard patterns are listed now, so
    a missing or empty shard or an empty list fails at start-up with the source named.
    `synthetic_sources`: the generated (training, validation) directories of the sources that
    name a synthetic corpus."""
    from flamingo_dist.config.load import source_configs
    from flamingo_dist.data.formats import list_shards

    sources, val = [], {}
    for sc in source_configs(cfg):
        if sc.synthetic:
            sc.shards, sc.val_shards = (synthetic_sources or {})[sc.name]
        spec = sc.shards or synthetic_dir
        where = f"data.sources[{sc.name}].shards" if cfg.data.sources else "data.shards"
        sources.append(Source(sc.name, sc.format, list_shards(spec, where), sc.weight, sc.micro_batch_size,
                              sc.min_sim, sc.image_after_text_p))
        val_spec = sc.val_shards or (synthetic_val_dir if not cfg.data.sources and not cfg.data.shards else None)
        if val_spec:
            val[sc.name] = list_shards(val_spec, f"data.sources[{sc.name}].val_shards" if cfg.data.sources
                                       else "data.val_shards")
    return sources, val
