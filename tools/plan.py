"""Plan a training run before booking the cluster: which layouts (tensor parallelism, ZeRO stage,
micro-batch, gradient accumulation, activation checkpointing) of a flavor or config fit a cluster,
each with its memory per GPU (frozen weights, trainable weights, gradients, optimizer state,
activations, buffers), bytes per collective per optimizer step, predicted step time and tokens/s;
and the recommendation. The model is built on the meta device from its config (no weights, no
GPU); the memory and bytes models are checked against real runs (tests/test_plan.py,
docs/scaling.md). Times are predictions from the cluster's numbers.

    python tools/plan.py --flavor 80b --gpus 64 --gpus-per-node 8 --gpu-memory-gib 80
    python tools/plan.py --flavor 9b --gpus 8 --gpu h200 --global-batch 256
    python tools/plan.py --config my.yaml --set data.seq_len=1024 --gpus 256 --json plan.json
    python tools/plan.py --against bench_3b_shapes.json [...]   # planned against measured peaks

`--against` takes the JSON of tools/bench_shapes.py runs (tools/gpu_check.sh writes them) and
prints, for every shape it ran, the planner's peak for that layout beside the measured one
(`torch.cuda.max_memory_allocated`); it fails when one is off by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def _bytes(x: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def _quiet() -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights" and megatron's notices
    warnings.filterwarnings("ignore")


def against(paths: list[str], tolerance: float) -> int:
    """Planned against measured peaks of tools/bench_shapes.py runs; 1 when one is off by more
    than `tolerance`."""
    from flamingo_dist.config.load import load_config
    from flamingo_dist.training.plan import Layout, ZeroSettings, memory, profile_model

    worst = 0.0
    print("run                                   measured GiB  planned GiB  planned/measured")
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        stage, tp = result["zero_stage"], result["tensor_parallel_size"]
        with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json")) as f:
            zs = ZeroSettings.from_config(json.load(f))
        for run in result["runs"]:
            if run.get("error") or not run.get("peak_memory_gib"):
                continue
            job = load_config(None, [f"flavor={result['flavor']}", f"data.seq_len={run['seq_len']}",
                                     f"data.max_images={run['images_per_row']}",
                                     f"train.precision={result['precision']}"])
            layout = Layout(tp=tp, dp=result["world_size"] // tp, zero=stage, micro_batch=run["micro_batch"],
                            grad_accum=1, activation_checkpointing=run["activation_checkpointing"])
            _, moments = memory(profile_model(job, tp), layout, zs, result["precision"])
            planned = max(moments.values()) / 2**30
            ratio = planned / run["peak_memory_gib"]
            worst = max(worst, abs(ratio - 1))
            ac = "on" if layout.activation_checkpointing else "off"
            name = f"{result['flavor']} ZeRO-{stage} {run['micro_batch']}x{run['seq_len']} AC {ac}"
            print(f"{name:38s}{run['peak_memory_gib']:>12.1f}{planned:>13.1f}{ratio:>18.3f}")
    print(f"worst: {worst:.1%} off (tolerance {tolerance:.0%})")
    return 0 if worst <= tolerance else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--flavor", help="debug, 3b, 9b, 80b (default: the config's, else debug)")
    src.add_argument("--config", help="a YAML config, as train.py takes")
    p.add_argument("--set", action="append", default=[], help="config overrides, key=value (data.seq_len=1024)")
    p.add_argument("--gpus", type=int, help="GPUs of the cluster (required unless --against)")
    p.add_argument("--gpu", choices=["h100", "h200"], default="h100", help="defaults for the numbers below")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float)
    p.add_argument("--intra-node-gbs", type=float, help="NVLink bus bandwidth per GPU, GB/s")
    p.add_argument("--inter-node-gbs", type=float, help="network bus bandwidth per GPU, GB/s")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU")
    p.add_argument("--mfu", type=float, default=0.40, help="frozen-aware MFU the compute runs at (default 0.40)")
    p.add_argument("--reserve-gib", type=float, default=4.0, help="memory kept free per GPU (CUDA, NCCL, fragmentation)")
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--deepspeed", help="one DeepSpeed config: its stage and buckets only "
                                       "(default: ds_configs/zero{1,2,3}.json, every stage)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (accumulation makes it up); "
                                                    "default: no accumulation")
    p.add_argument("--micro-batches", default="1,2,4,8,16,32")
    p.add_argument("--top", type=int, default=12, help="rows of the table")
    p.add_argument("--json", help="write every plan here")
    p.add_argument("--against", nargs="+", help="tools/bench_shapes.py JSON files: planned against measured peaks")
    p.add_argument("--tolerance", type=float, default=0.15, help="for --against (default 0.15)")
    args = p.parse_args(argv)
    if args.against:
        _quiet()
        return against(args.against, args.tolerance)
    if args.gpus is None:
        p.error("--gpus is required")

    _quiet()
    from flamingo_dist.config.load import load_config
    from flamingo_dist.config.schema import ConfigError
    from flamingo_dist.training.plan import GPU_PRESETS, Cluster, ZeroSettings, search

    start = time.perf_counter()
    try:
        sets = ([f"flavor={args.flavor}"] if args.flavor else []) + args.set
        job = load_config(args.config, sets)
        preset = GPU_PRESETS[args.gpu]
        overrides = {"gpu_memory_gib": args.gpu_memory_gib, "intra_node_gbs": args.intra_node_gbs,
                     "inter_node_gbs": args.inter_node_gbs, "peak_tflops": args.peak_tflops}
        cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node, mfu=args.mfu, reserve_gib=args.reserve_gib,
                          backend=args.backend,
                          **{k: (v if v is not None else preset[k]) for k, v in overrides.items()},
                          hbm_gbs=preset["hbm_gbs"])
        if args.deepspeed:
            with open(args.deepspeed) as f:
                ds = json.load(f)
            stage = int(ds.get("zero_optimization", {}).get("stage", 0))
            if stage not in (1, 2, 3):
                raise ConfigError(f"{args.deepspeed}: ZeRO stage {stage}; the planner plans ZeRO-1, 2 and 3")
            settings = {stage: ZeroSettings.from_config(ds)}
        else:
            settings = {}
            for stage in (1, 2, 3):
                with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json")) as f:
                    settings[stage] = ZeroSettings.from_config(json.load(f))
        micro = [int(x) for x in args.micro_batches.split(",")]
        profiles: dict = {}
        plans = []
        for stage, zs in settings.items():
            plans += search(job, cluster, zs, args.global_batch, micro, stages=(stage,), profiles=profiles)
    except (ConfigError, OSError, ValueError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    if not plans:
        print(f"plan: no layout: no TP size of 1-{cluster.gpus_per_node} divides {cluster.gpus} GPUs and the model, "
              "or --global-batch is not a multiple of DP x micro-batch for any of them", file=sys.stderr)
        return 2
    plans.sort(key=lambda q: (not q.fits, -q.tokens_per_s, q.peak))
    any_profile = next(iter(profiles.values()))
    tp1 = profiles.get(1)
    total = (tp1.frozen + tp1.trainable) if tp1 else None
    print(f"{job.flavor}: {total / 1e9:.2f}B parameters, {tp1.trainable / 1e9:.2f}B trainable; " if tp1 else
          f"{job.flavor}: ", end="")
    print(f"{job.data.seq_len} tokens x {job.data.max_images} images per sequence, {job.train.precision}")
    print(f"cluster: {cluster.gpus} GPUs ({cluster.gpus_per_node} per node) of {cluster.gpu_memory_gib:g} GiB, "
          f"{cluster.reserve_gib:g} GiB kept free; NVLink {cluster.intra_node_gbs:g} GB/s, network "
          f"{cluster.inter_node_gbs:g} GB/s per GPU; {cluster.peak_tflops:g} TFLOP/s at {cluster.mfu:.0%} MFU; "
          f"{cluster.backend}")
    head = ["layout", "peak GiB", "frozen", "trainable", "grads", "optim", "activ", "buffers", "s/step", "tokens/s",
            "fits"]
    rows = []
    for q in plans[: args.top]:
        m = q.memory
        rows.append([q.layout.describe(), _gib(q.peak), _gib(m["frozen weights"]), _gib(m["trainable weights"]),
                     _gib(m["gradients"]), _gib(m["optimizer state"]), _gib(m["activations"]), _gib(m["buffers"]),
                     f"{q.step_s:.3f}", f"{q.tokens_per_s:,.0f}", "yes" if q.fits else "NO"])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    fitting = [q for q in plans if q.fits]
    print(f"\n{len(fitting)} of {len(plans)} layouts fit (predicted step times; memory and bytes per collective "
          "are what the code does: tests/test_plan.py)")
    best = fitting[0] if fitting else None
    if best is None:
        smallest = min(plans, key=lambda q: q.peak)
        print(f"nothing fits: the smallest peak is {_gib(smallest.peak)} GiB ({smallest.layout.describe()}) against "
              f"{cluster.gpu_memory_gib - cluster.reserve_gib:g} GiB usable: more GPUs (ZeRO-3 divides the trainables "
              "by DP), a larger TP (divides the frozen LM), or bigger GPUs")
    else:
        print(f"\nrecommended: {best.layout.describe()}: {best.tokens_per_s:,.0f} tokens/s, "
              f"{best.step_s:.3f} s/step, peak {_gib(best.peak)} GiB per GPU")
        print("  memory per GPU at the peak: " + ", ".join(f"{k} {_gib(v)} GiB" for k, v in best.memory.items()))
        print("  per optimizer step, this rank sends: " + ", ".join(
            f"{k} {_bytes(v['bytes'])}" for k, v in sorted(best.comm.items())))
        zero = ("--deepspeed ds_configs/zero%d.json" % best.layout.zero)
        print(f"  run it: {zero} --set parallel.tensor_parallel_size={best.layout.tp} "
              f"train.micro_batch_size={best.layout.micro_batch} train.grad_accum_steps={best.layout.grad_accum} "
              f"train.activation_checkpointing={str(best.layout.activation_checkpointing).lower()}")
    print(f"\n(planned in {time.perf_counter() - start:.1f} s; model shapes from the meta device at TP "
          f"{', '.join(str(t) for t in sorted(profiles))}; {any_profile.seq_len} tokens per sequence)")
    if args.json:
        out = {"cluster": vars(cluster) if hasattr(cluster, "__dict__") else {}, "plans": [
            {"layout": vars(q.layout), "fits": q.fits, "peak_gib": q.peak / 2**30, "reserve_gib": cluster.reserve_gib,
             "memory_gib": {k: v / 2**30 for k, v in q.memory.items()},
             "moments_gib": {k: v / 2**30 for k, v in q.moments.items()}, "comm": q.comm, "step_s": q.step_s,
             "tokens_per_s": q.tokens_per_s} for q in plans]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
