"""Data-loading throughput of one worker process: decode + transform (+ read, parse, tokenize and
pack for the whole pipeline), in samples/s and images/s.

    python tools/bench_data.py                                  # generated web-like JPEG pairs, 224 px
    python tools/bench_data.py --image-size 32 --seq-len 64     # the debug flavor's sizes
    python tools/bench_data.py --shards 'cc/{00000..00009}.tar' --format pairs --tokenizer tok/

Without --shards it writes --num photo-like JPEGs (smooth colour fields, shapes and sensor noise,
--width x --height, quality 85, so their sizes resemble web images) as pairs shards in a temp
folder. One process with one torch thread, as a DataLoader worker runs: the figures are per
worker (per core). A benchmark, not a test: record its numbers in docs/benchmarks.md with the
command, the machine and the date.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time


def web_like_jpeg(rng, width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 90 * np.sin(a * x / 60 + b * y / 45 + p * 6)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        d.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                  fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    pil = pil.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(pil).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_pairs(out: str, num: int, width: int, height: int, per_shard: int = 64) -> list[str]:
    import numpy as np

    from flamingo_dist.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    w = ShardWriter(out, "bench", per_shard)
    for i in range(num):
        w.write({"__key__": f"{i:06d}", "jpg": web_like_jpeg(rng, width, height),
                 "txt": "a photo of shapes and colors on a background .", "json": "{}"})
    return w.close().shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="existing shards (default: generate web-like JPEG pairs)")
    p.add_argument("--format", default="pairs", choices=["obelics", "mmc4", "pairs", "video"])
    p.add_argument("--tokenizer", help="tokenizer folder (default: the synthetic word tokenizer)")
    p.add_argument("--num", type=int, default=512, help="generated images")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-images", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from flamingo_dist.data.formats import BadSample, Media, list_shards, parse, read_shard
    from flamingo_dist.data.pipeline import Source, Stream
    from flamingo_dist.data.processing import Limits, MediaDecoder, Processor

    torch.set_num_threads(1)  # as in a DataLoader worker
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    if args.shards:
        shards = list_shards(args.shards, "--shards")
    else:
        t0 = time.time()
        shards = write_pairs(os.path.join(tmp, "shards"), args.num, args.width, args.height)
        print(f"generated {args.num} JPEGs {args.width}x{args.height} in {time.time() - t0:.1f}s")
    from flamingo_dist.hf.llama import load_tokenizer

    tok_dir = args.tokenizer
    if tok_dir is None:
        from flamingo_dist.data.synthetic import build_tokenizer

        tok_dir = os.path.join(tmp, "tokenizer")
        build_tokenizer(tok_dir)
    from transformers import AutoTokenizer

    tok = load_tokenizer(tok_dir, len(AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)))
    media, nbytes = [], 0
    for path in shards:
        for _, sample in read_shard(path):
            if isinstance(sample, dict):
                try:
                    doc = parse(args.format, sample, random.Random(0), 0.0, 0.0)
                except BadSample:  # counted by the pipeline below; here only usable media are timed
                    continue
                for it in doc.items:
                    if isinstance(it, Media):
                        media.append(it)
                        nbytes += sum(len(f) for f in it.frames)
    results = {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
               "torch": torch.__version__, "image_size": args.image_size, "images_in_set": len(media),
               "mean_jpeg_kib": round(nbytes / max(1, len(media)) / 1024, 1)}
    for draft in (True, False):
        decode = MediaDecoder(args.image_size, limits=Limits(jpeg_draft=draft))
        decode(media[0])
        t0 = time.perf_counter()
        for m in media:
            decode(m)
        dt = time.perf_counter() - t0
        results[f"decode_transform_images_per_s{'' if draft else '_no_draft'}"] = round(len(media) / dt, 1)
    proc = Processor(tok, args.seq_len, args.max_images, args.image_size, limits=Limits())
    source = Source("bench", args.format, shards, micro_batch_size=args.micro_batch)
    stream = Stream(source, proc, 0, 1, seed=0)
    stream.next_batch()  # warm-up
    start = dict(stream.state["counts"])
    t0 = time.perf_counter()
    images = sequences = 0
    while stream.state["counts"]["samples"] - start["samples"] < len(media):
        batch, _ = stream.next_batch()
        images += int(batch["num_images"].sum())
        sequences += len(batch["input_ids"])
    dt = time.perf_counter() - t0
    samples = stream.state["counts"]["documents"] - start["documents"]
    results.update({"pipeline_samples_per_s": round(samples / dt, 1), "pipeline_images_per_s": round(images / dt, 1),
                    "pipeline_sequences_per_s": round(sequences / dt, 1),
                    "pipeline_ms_per_micro_batch": round(1000 * dt / max(1, sequences) * args.micro_batch, 2)})
    for k, v in results.items():
        print(f"{k}: {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
