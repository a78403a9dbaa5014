"""The planner over cluster sizes: for each flavor and GPU count, the recommended layout and what
it holds and sends, as the markdown tables of docs/scaling.md, and the plot of tokens/s against
GPUs (docs/img/scaling.png). Predictions from the model's shapes (training/plan.py).

    python tools/plan_scaling.py --flavors 9b 80b --gpus 8 64 256 --gpu h100 \
        --plot docs/img/scaling.png > /tmp/scaling_tables.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavors", nargs="+", default=["9b", "80b"])
    p.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 256])
    p.add_argument("--gpu", default="h100", choices=["h100", "h200"])
    p.add_argument("--mfu", type=float, default=0.40)
    p.add_argument("--plot", help="write the tokens/s plot here (PNG)")
    args = p.parse_args(argv)

    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from flamingo_dist.config.load import load_config
    from flamingo_dist.training.plan import GIB, GPU_PRESETS, Cluster, ZeroSettings, search

    settings = {}
    for stage in (1, 2, 3):
        with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json")) as f:
            settings[stage] = ZeroSettings.from_config(json.load(f))
    curves = {}
    for flavor in args.flavors:
        job = load_config(None, [f"flavor={flavor}"])
        profiles: dict = {}
        print(f"\n#### {flavor} on {args.gpu.upper()} ({GPU_PRESETS[args.gpu]['gpu_memory_gib']:g} GiB), "
              f"{job.data.seq_len} tokens and {job.data.max_images} images per sequence, bf16, MFU {args.mfu:.0%} "
              "(predicted)\n")
        print("| GPUs | recommended layout | peak GiB / GPU (frozen, trainable, grads, optimizer, activations, buffers) "
              "| layouts that fit | bytes sent / rank / step | s / step | tokens / s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n in args.gpus:
            cluster = Cluster(gpus=n, mfu=args.mfu, **GPU_PRESETS[args.gpu])
            plans = []
            for stage, zs in settings.items():
                plans += search(job, cluster, zs, stages=(stage,), profiles=profiles)
            fitting = sorted((q for q in plans if q.fits), key=lambda q: -q.tokens_per_s)
            if not fitting:
                print(f"| {n} | nothing fits | | 0 of {len(plans)} | | | |")
                continue
            best = fitting[0]
            m = best.memory
            split = ", ".join(f"{m[k] / GIB:.1f}" for k in ("frozen weights", "trainable weights", "gradients",
                                                             "optimizer state", "activations", "buffers"))
            sent = sum(v["bytes"] for v in best.comm.values()) / 1e9
            print(f"| {n} | {best.layout.describe()} | {best.peak / GIB:.1f} ({split}) | {len(fitting)} of {len(plans)} "
                  f"| {sent:.2f} GB | {best.step_s:.3f} | {best.tokens_per_s:,.0f} |")
            curves.setdefault(flavor, []).append((n, best.tokens_per_s))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for flavor, points in curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=f"{flavor} (best layout at each size)")
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle=":", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"{args.gpu.upper()} GPUs")
        ax.set_ylabel("tokens / s (predicted)")
        ax.set_title(f"flamingo_dist: planned throughput (MFU {args.mfu:.0%}; dotted: linear)")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
