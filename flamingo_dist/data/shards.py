"""Building shard sets in the formats data/formats.py reads, and checking them.

Builders (used by tools/build_shards.py):
- `build_pairs`: a folder of images + captions (CSV with `image`,`caption` columns, or JSONL
  {"image", "caption"}) -> img2dataset-style shards (key.<ext>, key.txt, key.json);
- `build_mmc4`: MMC4 document JSONL + a folder of its images -> mmc4 shards, each image as a
  member key.<image_name> (or inline base64 with inline=True);
- `build_video`: a folder with one sub-folder of frame images per video + captions (CSV with
  `video`,`caption`, or JSONL) -> video shards (key.frame000.<ext>, ..., key.txt).
Rows whose files are missing are left out and reported (the returned BuildReport), never
silently. Shards are written to a temp name and renamed when complete.

`check_shards` reads a shard set as training would (parse and decode every media) and reports
samples, usable documents, and bad samples per reason with examples.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from flamingo_dist.data.formats import REASONS, BadSample, parse, read_shard


@dataclass
class BuildReport:
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    left_out: list[str] = field(default_factory=list)  # "row: why"


class ShardWriter:
    """Samples -> out_dir/<prefix>-NNNNN.tar, `per_shard` samples each."""

    def __init__(self, out_dir: str, prefix: str = "shard", per_shard: int = 1000):
        import webdataset as wds

        self._wds = wds
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, per_shard
        self.report = BuildReport()
        self._sink, self._tmp, self._count = None, None, 0

    def write(self, sample: dict) -> None:
        if self._sink is None or self._count == self.per_shard:
            self._close_shard()
            path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.report.shards):05d}.tar")
            self._tmp, self._count = path + ".tmp", 0
            self._sink = self._wds.TarWriter(self._tmp)
            self.report.shards.append(path)
        self._sink.write(sample)
        self._count += 1
        self.report.samples += 1

    def _close_shard(self) -> None:
        if self._sink is not None:
            self._sink.close()
            os.replace(self._tmp, self.report.shards[-1])
            self._sink = None

    def close(self) -> BuildReport:
        self._close_shard()
        return self.report


def read_rows(path: str, columns: tuple[str, str]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV (with a header) or JSONL file; rows lacking a column are
    an error naming the line."""
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".jsonl") or path.endswith(".json"):
            rows: Iterable = (json.loads(line) for line in f if line.strip())
            start = 1
        else:
            rows, start = csv.DictReader(f), 2
        for n, row in enumerate(rows, start=start):
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{path}:{n}: no {', '.join(missing)} (needs columns {', '.join(columns)})")
            yield n, row


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lstrip(".").lower() or "jpg"


def build_pairs(images_dir: str, captions: str, out_dir: str, per_shard: int = 1000) -> BuildReport:
    w = ShardWriter(out_dir, "pairs", per_shard)
    for n, row in read_rows(captions, ("image", "caption")):
        path = os.path.join(images_dir, row["image"])
        if not os.path.isfile(path):
            w.report.left_out.append(f"{captions}:{n}: image {path} not found")
            continue
        with open(path, "rb") as f:
            data = f.read()
        ext = _ext(path)
        w.write({"__key__": f"{w.report.samples:09d}", "jpg" if ext == "jpeg" else ext: data,
                 "txt": row["caption"], "json": json.dumps({"image": row["image"], "caption": row["caption"]})})
    return w.close()


def build_mmc4(docs_jsonl: str, images_dir: str, out_dir: str, per_shard: int = 1000,
               inline: bool = False) -> BuildReport:
    w = ShardWriter(out_dir, "mmc4", per_shard)
    with open(docs_jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            doc = json.loads(line)
            sample = {"__key__": f"{w.report.samples:09d}"}
            kept = []
            for info in doc.get("image_info", []):
                name = info.get("image_name", "")
                path = os.path.join(images_dir, name)
                if not info.get("image_base64") and not os.path.isfile(path):
                    w.report.left_out.append(f"{docs_jsonl}:{n}: image {name} not found (image left out)")
                    continue
                if not info.get("image_base64"):
                    with open(path, "rb") as img:
                        data = img.read()
                    if inline:
                        info = {**info, "image_base64": base64.b64encode(data).decode()}
                    else:
                        sample[name.lower()] = data
                kept.append(info)
            if not kept:
                w.report.left_out.append(f"{docs_jsonl}:{n}: no image found; document left out")
                continue
            sample["json"] = json.dumps({**doc, "image_info": kept})
            w.write(sample)
    return w.close()


def build_video(frames_dir: str, captions: str, out_dir: str, per_shard: int = 100) -> BuildReport:
    w = ShardWriter(out_dir, "video", per_shard)
    for n, row in read_rows(captions, ("video", "caption")):
        folder = os.path.join(frames_dir, row["video"])
        frames = sorted(f for f in os.listdir(folder)) if os.path.isdir(folder) else []
        frames = [f for f in frames if _ext(f) in ("jpg", "jpeg", "png", "webp")]
        if not frames:
            w.report.left_out.append(f"{captions}:{n}: no frames in {folder}")
            continue
        sample = {"__key__": f"{w.report.samples:09d}", "txt": row["caption"]}
        for i, name in enumerate(frames):
            with open(os.path.join(folder, name), "rb") as f:
                sample[f"frame{i:03d}.{_ext(name)}"] = f.read()
        w.write(sample)
    return w.close()


@dataclass
class CheckReport:
    shards: int = 0
    samples: int = 0
    good: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    images_dropped: Counter = field(default_factory=Counter)  # images left out of usable documents, per reason
    examples: dict = field(default_factory=dict)  # reason -> first few "shard: detail"
    per_shard: dict = field(default_factory=dict)  # shard -> {"samples", "good", "skipped"}

    def example(self, path: str, e: BadSample) -> None:
        shown = self.examples.setdefault(e.reason, [])
        if len(shown) < 3:
            shown.append(f"{os.path.basename(path)}: {e.detail or e}")

    def as_dict(self) -> dict:
        return {"shards": self.shards, "samples": self.samples, "good": self.good, "images": self.images,
                "skipped": {r: self.skipped[r] for r in REASONS if self.skipped[r]},
                "images_dropped": {r: self.images_dropped[r] for r in REASONS if self.images_dropped[r]},
                "examples": self.examples, "per_shard": self.per_shard}


def check_shards(paths: list[str], fmt: str, image_size: int = 224, frames: int = 8, min_sim: float = 0.24,
                 limits=None) -> CheckReport:
    from flamingo_dist.data.processing import MediaDecoder, decode_document_media

    decode = MediaDecoder(image_size, frames if fmt == "video" else 0, limits)
    rep = CheckReport(shards=len(paths))
    for path in paths:
        mine = {"samples": 0, "good": 0, "skipped": Counter()}
        for index, sample in read_shard(path):
            mine["samples"] += 1
            try:
                if isinstance(sample, BadSample):
                    raise sample
                doc = parse(fmt, sample, random.Random(index), min_sim, 0.0)
                _, pixels, failures = decode_document_media(doc, decode)
                mine["good"] += 1
                rep.images += len(pixels)
                for f in failures:
                    rep.images_dropped[f.reason] += 1
                    rep.example(path, f)
            except BadSample as e:
                mine["skipped"][e.reason] += 1
                rep.example(path, e)
        rep.samples += mine["samples"]
        rep.good += mine["good"]
        rep.skipped.update(mine["skipped"])
        rep.per_shard[path] = {"samples": mine["samples"], "good": mine["good"], "skipped": dict(mine["skipped"])}
    return rep
