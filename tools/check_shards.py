"""Check a shard set the way training reads it: every sample parsed and every image or video
decoded; reports samples, usable documents, images, and bad samples per reason with examples.

    python tools/check_shards.py --format pairs 'shards/cc/pairs-{00000..00099}.tar' [--json report.json]

Exit status: 0 when every sample and every image in it is usable, 1 when some samples are bad or
some images were left out of usable documents, 2 on a missing shard set.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard patterns (brace notation, glob) or folders")
    p.add_argument("--format", required=True, choices=["obelics", "mmc4", "pairs", "video"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--min-sim", type=float, default=0.24, help="mmc4 similarity threshold")
    p.add_argument("--json", help="also write the full report (per shard) here")
    args = p.parse_args(argv)

    from flamingo_dist.data.formats import list_shards
    from flamingo_dist.data.shards import check_shards

    try:
        paths = [path for spec in args.shards for path in list_shards(spec, "shards")]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = check_shards(paths, args.format, args.image_size, args.frames, args.min_sim)
    bad = sum(rep.skipped.values())
    print(f"{rep.shards} shards, {rep.samples} samples: {rep.good} usable ({rep.images} images), {bad} bad")
    for reason, n in rep.as_dict()["skipped"].items():
        print(f"  {reason}: {n}   e.g. {'; '.join(rep.examples[reason])}")
    dropped = rep.as_dict()["images_dropped"]
    if dropped:
        print(f"images left out of usable documents: {sum(dropped.values())}")
        for reason, n in dropped.items():
            print(f"  {reason}: {n}   e.g. {'; '.join(rep.examples[reason])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.as_dict(), f, indent=1)
    return 1 if bad or dropped else 0


if __name__ == "__main__":
    sys.exit(main())
