"""Time training steps of a config after warm-up: tokens/s, images/s, peak memory per rank and
frozen-aware model FLOP utilisation (formula in flamingo_dist/models/flops.py).

    python tools/benchmark.py --deepspeed ds_configs/zero2.json [--config x.yaml] [--set k=v ...]
    deepspeed --num_gpus 8 tools/benchmark.py --deepspeed ds_configs/zero2.json --config 9b.yaml

Runs the real trainer (data pipeline included). Results go to stdout and, with --out, to JSON.
A benchmark, not a test: record its numbers in docs/benchmarks.md with the command, machine, date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

# Dense peak TFLOP/s per device by name fragment: (bf16, fp32). Datasheet values (SXM parts).
PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


def device_peak_tflops(precision: str) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32) in PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()  # the package's messages (progress, resume, backbones) on rank 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU; default: datasheet value of a known GPU, none on CPU")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from flamingo_dist.config.load import load_config, validate

    cfg = load_config(args.config, [*args.set, f"train.steps={args.warmup + args.steps}", "tracking.mlflow=false"])
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))

    import torch
    import torch.distributed as dist

    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed
    from flamingo_dist.models.flops import train_flops
    from flamingo_dist.training.trainer import Trainer

    layout = init_distributed(cfg.parallel.tensor_parallel_size)
    trainer = Trainer(cfg, args.deepspeed, layout).build(track=False)

    def sync():
        if layout.device.type == "cuda":
            torch.cuda.synchronize()

    trainer.start_watchdog()  # as in training (train.hang_timeout_s=0: off), each step under its limit
    limit = cfg.train.hang_timeout_s

    for _ in range(args.warmup):
        trainer.phase("step", cfg.train.hang_timeout_first_step_s)
        trainer.train_step()
    sync()
    if layout.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    labelled_tokens = images = 0.0
    for _ in range(args.steps):
        trainer.phase("step", limit)
        m = trainer.train_step()
        labelled_tokens += m["tokens_per_s"] * m["step_time_s"]
        images += m["images_per_s"] * m["step_time_s"]
    sync()
    dist.barrier()
    elapsed = time.perf_counter() - t0

    t, d = cfg.train, cfg.data
    seqs_per_step = t.micro_batch_size * t.grad_accum_steps * layout.dp_size
    # Padding media slots are not encoded (Flamingo.encode_media): the vision encoder and resampler
    # count the images the steps really had.
    flops_per_step = train_flops(cfg.model, trainer.model.vision.shape(), seqs_per_step, d.seq_len, d.max_images,
                                 layout.tp_size, encoded_images=images / args.steps)
    mem = [None] * layout.world_size
    dist.all_gather_object(mem, round(peak_memory_gib(layout.device), 3))
    peak = args.peak_tflops or device_peak_tflops(t.precision)
    achieved = flops_per_step * args.steps / elapsed / 1e12
    result = {
        "flavor": cfg.flavor, "precision": t.precision, "world_size": layout.world_size,
        "tensor_parallel_size": layout.tp_size, "data_parallel_size": layout.dp_size,
        "zero_stage": trainer.engine.zero_optimization_stage(),
        "activation_checkpointing": t.activation_checkpointing,
        "device": torch.cuda.get_device_name() if layout.device.type == "cuda" else platform.processor() or "cpu",
        "step_time_s": elapsed / args.steps,
        "tokens_per_s": seqs_per_step * d.seq_len * args.steps / elapsed,
        "labelled_tokens_per_s": labelled_tokens / elapsed,
        "images_per_s": images / elapsed,
        "model_tflops_per_step": flops_per_step / 1e12,
        "achieved_tflops_per_device": achieved / layout.world_size,
        "mfu": (achieved / layout.world_size / peak) if peak else None,
        "peak_memory_gib_per_rank": mem,
    }
    if layout.rank == 0:
        width = max(len(k) for k in result)
        for k, v in result.items():
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    trainer.close()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
