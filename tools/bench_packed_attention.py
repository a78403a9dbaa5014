"""Packed-document self-attention: model.packed_attention `mask` (scaled_dot_product_attention with
the [B, 1, T, T] boolean mask) against `flex` (FlexAttention's compiled kernel with the block
mask), the LM's own code (`DecoderLayer`'s attention call) on one attention shape.

Rows are packed with documents of random lengths (`--mean-doc` tokens on average) and a padding
tail, as the packer leaves them. Times the attention alone, forward only by default (what CPU can
run: torch has no FlexAttention backward on CPU), forward + backward with `--backward` (GPU).
The masks are built once per row layout, outside the timing, as training builds them once per
micro-batch for all layers.

    python tools/bench_packed_attention.py                       # 3b-like shape on this machine's CPU
    python tools/bench_packed_attention.py --device cuda --backward --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def document_ids(batch: int, seq: int, mean_doc: int, gen):
    import torch

    ids = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        pos, doc = 0, 1
        while pos < seq - 16:
            n = int(torch.randint(mean_doc // 2, mean_doc * 3 // 2 + 1, (1,), generator=gen))
            ids[b, pos: pos + n] = doc
            pos, doc = pos + n, doc + 1
        # the last document is cut where the row ends; a short tail of padding (id 0) stays 0
    return ids


def main(argv=None) -> int:
    import torch

    from flamingo_dist.models.flamingo import document_block_mask, document_causal_mask
    from flamingo_dist.models.lm import flex_attention_kernel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mean-doc", type=int, default=300, help="mean document length in tokens")
    p.add_argument("--backward", action="store_true", help="time forward + backward (needs a GPU for flex)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.backward and args.device == "cpu":
        p.error("--backward: torch has no FlexAttention backward on CPU")

    dev, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    docs = document_ids(args.batch, args.seq, args.mean_doc, gen).to(dev)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dev, dtype).requires_grad_(args.backward) for _ in range(3))
    masks = {"mask": document_causal_mask(docs), "flex": document_block_mask(docs)}
    kernels = {"mask": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks["mask"]),
               "flex": lambda: flex_attention_kernel()(q, k, v, block_mask=masks["flex"])}
    grad = torch.randn(shape, generator=gen).to(dev, dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    result = {"shape": vars(args), "density": float(masks["mask"].float().mean())}
    outs = {}
    for name, fn in kernels.items():
        ctx = torch.enable_grad if args.backward else torch.no_grad
        times = []
        with ctx():
            for i in range(args.warmup + args.iters):
                sync()
                t0 = time.perf_counter()
                out = fn()
                if args.backward:
                    out.backward(grad)
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        outs[name] = out.detach().float()
        result[name] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}
    result["max_abs_diff"] = float((outs["flex"] - outs["mask"]).abs().max())
    result["speedup_flex_over_mask"] = result["mask"]["median_ms"] / result["flex"]["median_ms"]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
