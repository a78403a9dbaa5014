"""Peak memory and time of one forward + backward with the loss on the whole batch and with
`train.loss_chunk_tokens` (the head and the loss on chunks of positions, recomputed in backward).

    python tools/bench_loss_chunks.py [--vocab 32000] [--batch 8] [--seq 256] [--chunks 0 64]

Each setting runs in its own process (peak resident memory is per process: `ru_maxrss`), after a
warm-up step; the model is the debug flavor with a random LM of the given vocabulary, fp32.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(vocab: int, batch: int, seq: int, chunk: int, steps: int) -> dict:
    import torch

    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed, tp_group
    from flamingo_dist.training.build import build_model
    from flamingo_dist.training.engine import apply_freeze

    init_distributed(1)
    cfg = load_config(None, ["model.synthetic_backbones=null", f"model.lm.vocab_size={vocab}"])
    model = build_model(cfg.model, tp_group(), seed=0, dtype=torch.float32).train()
    apply_freeze(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, 1, dtype=torch.long)
    mask[:, 1:, 0] = 1
    pixels = torch.randn(batch, 1, 3, 32, 32, generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = model(ids, pixels, mask, labels_BT=ids, loss_chunk_tokens=chunk)
        loss.backward()
        return loss.item()

    step()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    destroy_distributed()
    return {"chunk": chunk, "loss": loss, "s_per_step": round(seconds, 4), "peak_rss_mib": round(peak / 1024, 1),
            "rss_growth_after_warmup_mib": round((peak - before) / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.vocab, args.batch, args.seq, args.one, args.steps)))
        return 0
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2 ** 20
    print(f"vocab {args.vocab}, {args.batch} x {args.seq} tokens: full fp32 logits {logits_mib:.0f} MiB")
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(chunk), "--vocab", str(args.vocab),
                              "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
