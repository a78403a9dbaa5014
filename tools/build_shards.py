"""Build webdataset shards in the formats the trainer reads (see flamingo_dist/data/formats.py).

    python tools/build_shards.py pairs --images imgs/ --captions captions.csv --out shards/cc
    python tools/build_shards.py mmc4 --docs docs.jsonl --images imgs/ --out shards/mmc4 [--inline]
    python tools/build_shards.py video --frames clips/ --captions captions.jsonl --out shards/vid

captions: CSV with a header (`image,caption`; for video `video,caption`, the video being a
sub-folder of --frames holding its frame images in name order) or JSONL with the same keys.
Rows whose files are missing are left out and listed; the exit status is 1 when any was left out
(0 with --allow-missing). Then train with e.g. `--set data.sources='[{name: cc, format: pairs,
shards: shards/cc}]'`, and check a set with tools/check_shards.py.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    pairs = sub.add_parser("pairs", help="image folder + captions CSV/JSONL (img2dataset layout)")
    pairs.add_argument("--images", required=True)
    pairs.add_argument("--captions", required=True)
    mmc4 = sub.add_parser("mmc4", help="MMC4 document JSONL + image folder")
    mmc4.add_argument("--docs", required=True)
    mmc4.add_argument("--images", required=True)
    mmc4.add_argument("--inline", action="store_true", help="store images as base64 inside the JSON")
    video = sub.add_parser("video", help="one frame folder per video + captions CSV/JSONL")
    video.add_argument("--frames", required=True)
    video.add_argument("--captions", required=True)
    for s in (pairs, mmc4, video):
        s.add_argument("--out", required=True, help="output folder for <kind>-NNNNN.tar")
        s.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
        s.add_argument("--allow-missing", action="store_true", help="exit 0 even when rows were left out")
    args = p.parse_args(argv)

    from flamingo_dist.data import shards

    try:
        if args.kind == "pairs":
            rep = shards.build_pairs(args.images, args.captions, args.out, args.per_shard)
        elif args.kind == "mmc4":
            rep = shards.build_mmc4(args.docs, args.images, args.out, args.per_shard, args.inline)
        else:
            rep = shards.build_video(args.frames, args.captions, args.out, args.per_shard)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in rep.left_out:
        print(f"left out: {line}", file=sys.stderr)
    print(f"wrote {rep.samples} samples in {len(rep.shards)} shards to {args.out}; left out {len(rep.left_out)}")
    return 1 if rep.left_out and not args.allow_missing else 0


if __name__ == "__main__":
    sys.exit(main())
