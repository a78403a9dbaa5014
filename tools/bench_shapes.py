"""Step time, frozen-aware MFU and peak memory of one config over micro-batch x sequence-length
shapes, in one process: the model and the engine are built once, each shape gets its own data
feed (the real pipeline, images per row growing with the sequence: --images-per-256). Shapes run
smallest first; a shape predicted not to fit (peak memory scaled by tokens from the largest shape
run so far, against the device's memory) runs with activation checkpointing, and a shape that
runs out of memory ends the sweep (DeepSpeed's state after a failed backward is not trusted).

    python tools/bench_shapes.py --deepspeed ds_configs/zero2.json --set flavor=3b \\
        --shapes 8x256 16x256 32x256 8x512 16x512 32x512 8x1024 16x1024 32x1024 --out shapes.json

`--profile-steps N` profiles N more steps of the first shape (torch.profiler, CUDA activity on a
GPU) and writes a summary: device time per phase (forward, backward, the step's read and the
optimizer), kernels launched per step, device busy time over wall time, host synchronisations
per step (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize, cudaMemcpy) and the
top kernels. A benchmark, not a test: record its numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _benchmark_tool():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_shape(text: str) -> tuple[int, int]:
    try:
        mb, seq = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a shape is MICROBATCHxSEQLEN, e.g. 8x256") from None
    return mb, seq


def predicted_peak(base_gib: float, runs: list[dict], tokens: int) -> float | None:
    """Peak memory of a shape of `tokens` tokens per micro-batch, scaled from the largest shape run
    without activation checkpointing: what it held above the memory before any step, times the
    ratio of tokens."""
    done = [r for r in runs if not r.get("activation_checkpointing") and r.get("peak_memory_gib")]
    if not done:
        return None
    ref = max(done, key=lambda r: r["tokens_per_micro_batch"])
    return base_gib + (ref["peak_memory_gib"] - base_gib) * tokens / ref["tokens_per_micro_batch"]


def set_activation_checkpointing(model, on: bool) -> None:
    for layer in model.layers:
        layer.activation_checkpointing = on


def use_shape(trainer, base_cfg, mb: int, seq: int, images_per_256: int):
    """Point the trainer at a fresh data feed of micro-batch `mb` x `seq` tokens."""
    from flamingo_dist.data.feed import DataFeed
    from flamingo_dist.distributed.slurm import ignore_stop_signals

    cfg = copy.deepcopy(base_cfg)
    cfg.train.micro_batch_size, cfg.data.seq_len = mb, seq
    cfg.data.max_images = max(1, images_per_256 * seq // 256)
    lay = trainer.layout
    trainer.cfg = cfg
    trainer.sources = [dataclasses.replace(s, micro_batch_size=mb) for s in trainer.sources]
    trainer.feed = DataFeed(cfg, trainer.sources, trainer.tokenizer, lay.dp_rank, lay.dp_size, trainer.dp_group,
                            trainer.device, None, worker_init_fn=ignore_stop_signals)
    return cfg


def time_steps(trainer, cfg, warmup: int, steps: int, peak_tflops, sync) -> dict:
    import torch.distributed as dist

    from flamingo_dist.models.flops import train_flops

    bench = _benchmark_tool()
    lay = trainer.layout
    for _ in range(warmup):
        trainer.train_step()
    sync()
    if lay.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    images = 0.0
    for _ in range(steps):
        m = trainer.train_step()
        images += m["images_per_s"] * m["step_time_s"]
    sync()
    elapsed = time.perf_counter() - t0
    t, d = cfg.train, cfg.data
    seqs = t.micro_batch_size * t.grad_accum_steps * lay.dp_size
    flops = train_flops(cfg.model, trainer.model.vision.shape(), seqs, d.seq_len, d.max_images, lay.tp_size,
                        encoded_images=images / steps)
    achieved = flops * steps / elapsed / 1e12 / lay.world_size
    return {"step_time_s": elapsed / steps, "tokens_per_s": seqs * d.seq_len * steps / elapsed,
            "images_per_s": images / elapsed, "model_tflops_per_step": flops / 1e12,
            "achieved_tflops_per_device": achieved, "mfu": achieved / peak_tflops if peak_tflops else None,
            "peak_memory_gib": bench.peak_memory_gib(lay.device)}


def profile_summary(trainer, steps: int, sync) -> dict:
    """torch.profiler over `steps` steps: device time per phase, kernels, busy time, host syncs."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = trainer.device.type == "cuda"
    forward, backward, read, apply = trainer._forward, trainer.engine.backward, trainer._read, trainer._apply

    def marked(name, fn):
        def call(*a, **k):
            with record_function(f"phase:{name}"):
                return fn(*a, **k)
        return call

    trainer._forward, trainer.engine.backward = marked("forward", forward), marked("backward", backward)
    trainer._read, trainer._apply = marked("read", read), marked("optimizer", apply)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        sync()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step()
            sync()
        wall = time.perf_counter() - t0
    finally:
        trainer._forward, trainer.engine.backward, trainer._read, trainer._apply = forward, backward, read, apply
    averages = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0) or 0.0)

    def self_device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    phases = {e.key.removeprefix("phase:"): {"device_ms_per_step": device_us(e) / 1e3 / steps,
                                             "host_ms_per_step": e.cpu_time_total / 1e3 / steps,
                                             "calls_per_step": e.count / steps}
              for e in averages if e.key.startswith("phase:")}
    kernels = [e for e in averages if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(self_device_us(e) for e in kernels)
    syncs = {e.key: e.count / steps for e in averages if e.key in SYNCS}
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    top = sorted(kernels, key=self_device_us, reverse=True)[:25]
    return {"steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "phases": phases,
            "kernel_ms_per_step": kernel_us / 1e3 / steps,
            "device_busy_fraction": (kernel_us / 1e6) / wall if cuda else None,  # kernels on several streams may overlap
            "kernels_per_step": sum(e.count for e in kernels) / steps, "kernel_launches_per_step": launches / steps,
            "host_syncs_per_step": syncs,
            "top_kernels": [{"name": e.key[:120], "calls_per_step": e.count / steps,
                             "ms_per_step": self_device_us(e) / 1e3 / steps} for e in top],
            "table": averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)}


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[(8, 256)], help="MICROBATCHxSEQLEN ...")
    p.add_argument("--images-per-256", type=int, default=5, help="image slots per row per 256 tokens (the paper's 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many steps of the first shape")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--memory-margin", type=float, default=0.9,
                   help="a shape whose predicted peak is above this share of the device memory gets activation "
                        "checkpointing")
    p.add_argument("--out")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    from flamingo_dist.config.load import load_config, validate
    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed
    from flamingo_dist.training.trainer import Trainer

    shapes = sorted(args.shapes, key=lambda s: (s[0] * s[1], s[1]))
    big_seq = max(s for _, s in shapes)
    cfg = load_config(args.config, [*args.set, "tracking.mlflow=false", "train.log_every=1000000"])
    if cfg.model.lm.max_position_embeddings < big_seq:
        cfg.model.lm.max_position_embeddings = big_seq
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    layout = init_distributed(cfg.parallel.tensor_parallel_size)
    t_build = time.perf_counter()
    trainer = Trainer(cfg, args.deepspeed, layout).build(track=False)
    build_s = time.perf_counter() - t_build
    cuda = layout.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    bench = _benchmark_tool()
    peak_tflops = args.peak_tflops or bench.device_peak_tflops(cfg.train.precision)
    capacity = torch.cuda.get_device_properties(layout.device).total_memory / 2**30 if cuda else None
    base_gib = torch.cuda.memory_allocated(layout.device) / 2**30 if cuda else 0.0
    ac_default = cfg.train.activation_checkpointing
    runs, profile = [], None
    for mb, seq in shapes:
        tokens = mb * seq
        predicted = predicted_peak(base_gib, runs, tokens) if cuda else None
        ac = ac_default or (predicted is not None and predicted > args.memory_margin * capacity)
        set_activation_checkpointing(trainer.model, ac)
        shape_cfg = use_shape(trainer, cfg, mb, seq, args.images_per_256)
        entry = {"micro_batch": mb, "seq_len": seq, "tokens_per_micro_batch": tokens,
                 "images_per_row": shape_cfg.data.max_images, "activation_checkpointing": ac,
                 "predicted_peak_gib": predicted}
        try:
            entry.update(time_steps(trainer, shape_cfg, args.warmup, args.steps, peak_tflops, sync))
            if args.profile_steps and profile is None:
                profile = {"shape": f"{mb}x{seq}", **profile_summary(trainer, args.profile_steps, sync)}
        except torch.cuda.OutOfMemoryError as e:
            entry["error"] = f"out of memory: {str(e).splitlines()[0]}"
            runs.append(entry)
            print(f"{mb}x{seq}: out of memory{' even' if ac else ''} with activation checkpointing {ac}; "
                  "the sweep stops here", flush=True)
            break
        runs.append(entry)
        if layout.rank == 0:
            mfu = f"{entry['mfu']:.1%}" if entry.get("mfu") is not None else "n/a"
            print(f"{mb:>3}x{seq:<5} AC {'on ' if ac else 'off'} step {entry['step_time_s']:.4f} s  "
                  f"{entry['tokens_per_s']:,.0f} tok/s  {entry['images_per_s']:,.1f} img/s  MFU {mfu}  "
                  f"peak {entry['peak_memory_gib']:.1f} GiB", flush=True)
    ok = [r for r in runs if "error" not in r and r.get("mfu") is not None]
    best = max(ok, key=lambda r: r["mfu"]) if ok else None
    result = {"flavor": cfg.flavor, "precision": cfg.train.precision, "zero_stage": trainer.engine.zero_optimization_stage(),
              "world_size": layout.world_size, "tensor_parallel_size": layout.tp_size,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "device_memory_gib": capacity,
              "memory_before_steps_gib": base_gib, "build_s": build_s, "peak_tflops": peak_tflops,
              "compile": cfg.train.compile, "runs": runs, "best": best, "profile": profile}
    if layout.rank == 0:
        if best:
            print(f"best: {best['micro_batch']}x{best['seq_len']} MFU {best['mfu']:.1%}")
        if profile:
            print(f"profile of {profile['shape']}: wall {profile['wall_ms_per_step']:.1f} ms/step, kernels "
                  f"{profile['kernel_ms_per_step']:.1f} ms/step, {profile['kernels_per_step']:.0f} kernels/step, "
                  f"syncs/step {profile['host_syncs_per_step']}, phases "
                  + ", ".join(f"{k} {v['device_ms_per_step']:.1f} ms" for k, v in profile["phases"].items()))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    trainer.close()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
