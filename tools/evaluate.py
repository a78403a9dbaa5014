"""Few-shot evaluation of a committed checkpoint (ours) or of a Hugging Face IDEFICS directory
(e.g. one exported by tools/export_idefics.py), with the OpenFlamingo protocol
(flamingo_dist/eval/fewshot.py).

    python tools/evaluate.py --checkpoint runs/x/checkpoints/step_00001000 --tasks-file tasks.yaml \\
        --shots 0 4 8 16 32 --methods random rices --trials 3 --out results.json
    python tools/evaluate.py --hf exported/ --synthetic runs/x/eval_tasks --shots 0 4 --out hf.json

--tasks-file lists task specs (flamingo_dist/eval/tasks.py `load_task`); --synthetic evaluates on
the project's synthetic suite (written there when missing). One process; the result JSON carries
the protocol version.
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()  # the package's messages (progress, resume, backbones) on rank 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a committed checkpoint directory (step_N)")
    src.add_argument("--hf", help="a transformers IdeficsForVisionText2Text directory")
    p.add_argument("--tasks-file", help="YAML/JSON list of task specs")
    p.add_argument("--synthetic", metavar="DIR", help="the synthetic suite's directory")
    p.add_argument("--synthetic-tasks", nargs="+", default=[],
                   help="these tasks of the synthetic suite (default: all but the binding pair)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    p.add_argument("--methods", nargs="+", default=["random"], choices=["random", "rices"])
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--max-queries", type=int, help="evaluate only the first N queries of each task")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-beams", type=int, default=3, help="beam search width (1: greedy)")
    p.add_argument("--feature-cache", help="where RICES features are cached (default: beside --out)")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args(argv)
    if not args.tasks_file and not args.synthetic:
        p.error("give --tasks-file and/or --synthetic")

    import torch

    from flamingo_dist.eval import fewshot
    from flamingo_dist.eval import tasks as eval_tasks

    suite = {}
    try:
        if args.synthetic:
            suite.update(eval_tasks.select_synthetic(eval_tasks.synthetic_suite(args.synthetic), args.synthetic_tasks))
        if args.tasks_file:
            import yaml

            with open(args.tasks_file) as f:
                for spec in yaml.safe_load(f):
                    name, kind, queries, support = eval_tasks.load_task(spec, os.path.dirname(args.tasks_file))
                    suite[name] = (kind, queries, support)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_queries:
        suite = {n: (k, q[:args.max_queries], s) for n, (k, q, s) in suite.items()}
    cache = args.feature_cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "features")

    if args.hf:
        from transformers import AutoTokenizer, IdeficsForVisionText2Text

        hf = IdeficsForVisionText2Text.from_pretrained(args.hf, torch_dtype=torch.float32)
        model, tokenizer = fewshot.HFIdefics(hf), AutoTokenizer.from_pretrained(args.hf)
        image_size = hf.config.vision_config.image_size
        results = fewshot.run(model, tokenizer, suite, args.shots, args.methods, args.trials, image_size,
                              out_json=args.out, feature_cache=cache, max_new_tokens=args.max_new_tokens,
                              num_beams=args.num_beams)
    else:
        from flamingo_dist.distributed.groups import destroy_distributed, init_distributed
        from flamingo_dist.hf.llama import load_tokenizer
        from flamingo_dist.training.checkpoint import CheckpointError, model_from_checkpoint, tokenizer_dir

        init_distributed(1)
        try:
            model, cfg = model_from_checkpoint(args.checkpoint)
            tokenizer = load_tokenizer(tokenizer_dir(cfg), cfg.model.lm.vocab_size)
            results = fewshot.run(model, tokenizer, suite, args.shots, args.methods, args.trials,
                                  model.vision.image_size, out_json=args.out, feature_cache=cache,
                                  max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            destroy_distributed()
    print(json.dumps(results["tasks"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
