"""Build the tiny pretrained backbones of the synthetic corpus ahead of training (training builds
them itself when missing): a LLaMA-style LM as a Hugging Face directory and an open_clip ViT
weights file, for the LM shape and vision tower of a config (default: the debug flavor).

    python tools/build_backbones.py [--out data/backbones] [--config x.yaml] [--set k=v ...]

Prints what the pretraining reached (the LM's accuracy at reading attributes from context, the
ViT's zero-shot attribute accuracy); exit 1 when a backbone falls short (nothing is kept then),
2 on a bad config or a directory holding something else.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()  # the package's messages (progress, resume, backbones) on rank 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="directory (default: the config's model.synthetic_backbones)")
    p.add_argument("--config", help="YAML config whose LM shape and vision tower to build for")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from flamingo_dist.config.load import load_config
    from flamingo_dist.config.schema import ConfigError
    from flamingo_dist.demo.backbones import PretrainingFellShort, ensure_backbones, use_backbones

    try:
        cfg = load_config(args.config, args.set)
        out = args.out or cfg.model.synthetic_backbones
        if not out:
            raise ConfigError("--out: needed when the config sets no model.synthetic_backbones")
        done = ensure_backbones(out, cfg.model.lm, cfg.model.vision.model_name, cfg.data.image_size)
        cfg.model.synthetic_backbones = out
        use_backbones(cfg.model)  # the build fits this config
    except PretrainingFellShort as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # BackboneError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in done.items() if k != "recipe"}, indent=1))
    print(f"backbones in {out}: LM {cfg.model.lm.path}, ViT {cfg.model.vision.pretrained}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
