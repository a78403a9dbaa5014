"""Operators and host reads per optimizer step, split into forward, backward and the rest, for
our trainer and for OpenFlamingo's training step. It runs on the CPU, so it guides the work on the
host overhead of a step when no GPU is at hand: on a GPU every operator is a kernel launch and
every host read a stall of the host until the device has caught up.

    python tools/bench_step_ops.py --shape harness --stacks ours openflamingo
    python tools/bench_step_ops.py --shape 3b-small
    python tools/bench_step_ops.py --shape debug --stage 3

What is counted (flamingo_dist/training/opcount.py): an *operator* is an aten call seen by a
TorchDispatchMode, views and metadata-only calls excluded (they launch nothing); a *host read* is
`aten::_local_scalar_dense` (`.item()`, `float()`, `bool()`), `aten::nonzero`, `aten::is_nonzero`,
`aten::equal`, a copy from the GPU to the host, or `Tensor.tolist()`/`.numpy()`. Phases: ours,
`forward` is the engine's forward of each micro-batch (`Trainer._forward`) and `backward`
`engine.backward`; OpenFlamingo, the model call and `loss.backward()`; everything else in the
step is `rest`: optimizer, clipping, DeepSpeed's bookkeeping, the trainer's own. The data loader
is not counted (in production it runs in worker processes). OpenFlamingo's clipping and AdamW run
as torch runs them on a GPU (`foreach`), not as its per-tensor CPU defaults.

Shapes:
- `harness`: the model and batch of tools/bench_openflamingo.py (both stacks, the same frozen
  weights and tokens): ViT 256 x 4 at 224 px, LLaMA 512 x 8, resampler 6 x 64, cross-attention
  every 2 layers, 4 x 256 tokens x 3 images. Ours trains it through the real trainer (a feed of
  that one batch).
- `3b-small`: the 3b flavor's structure (24 LM layers with cross-attention before every one, a
  24-layer ViT, resampler 6 x 64) at small widths, on the synthetic corpus: the operator count
  of the real 3b step at a size this machine runs in seconds.
- `debug`: the debug flavor on the synthetic corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_3B = ["flavor=3b", "model.lm.vocab_size=512", "model.lm.hidden_size=128", "model.lm.intermediate_size=256",
            "model.lm.num_heads=16", "model.lm.max_position_embeddings=256", "model.vision.model_name=flamingo-3b-small-vit",
            "model.resampler.num_heads=4", "model.resampler.head_dim=16", "data.image_size=56", "data.seq_len=128",
            "data.max_images=5", "data.num_workers=0", "train.micro_batch_size=2",
            "train.activation_checkpointing=false"]


def _bench_openflamingo():
    spec = importlib.util.spec_from_file_location("bench_openflamingo", os.path.join(REPO, "tools", "bench_openflamingo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours_trainer(shape: str, stage: int, precision: str, work: str, sets: list[str]):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import init_distributed
    from flamingo_dist.training.trainer import Trainer

    common = ["tracking.mlflow=false", f"tracking.run_dir={work}/run-{shape}", f"train.precision={precision}",
              "train.log_every=1000000", *sets]
    if shape == "harness":  # bench_openflamingo's own trainer on its batch
        of = _bench_openflamingo()
        of.prepare(work)
        return of.ours_trainer(work, precision, [of.IMAGES] * of.BATCH, sets=common, stage=stage)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", os.environ.get("BENCH_PORT", "29743"))):
        os.environ.setdefault(key, value)
    layout = init_distributed(1)
    sets = (SMALL_3B if shape == "3b-small" else []) + [f"data.synthetic_dir={work}/synthetic-{shape}",
                                                       "data.synthetic_num_docs=64"] + common
    return Trainer(load_config(None, sets), os.path.join(REPO, "ds_configs", f"zero{stage}.json"),
                   layout).build(track=False)


def count_ours(args) -> dict:
    from flamingo_dist.training.opcount import StepCounter

    trainer = ours_trainer(args.shape, args.stage, args.precision, args.work, args.set)
    for _ in range(args.warmup):
        trainer.train_step()
    counter = StepCounter()
    forward, backward, draw = trainer._forward, trainer.engine.backward, trainer.feed.step_batches

    def counted_forward(*a, **k):
        with counter.phase("forward"):
            return forward(*a, **k)

    def counted_backward(*a, **k):
        with counter.phase("backward"):
            return backward(*a, **k)

    def uncounted_draw(*a, **k):
        with counter.paused():
            return draw(*a, **k)

    trainer._forward, trainer.engine.backward, trainer.feed.step_batches = counted_forward, counted_backward, uncounted_draw
    with counter:
        for _ in range(args.steps):
            trainer.train_step()
    params = list(trainer.model.parameters())
    return report(counter, args.steps, trainable=sum(p.numel() for p in params if p.requires_grad),
                  tensors={"trainable": sum(p.requires_grad for p in params),
                           "frozen": sum(not p.requires_grad for p in params)})


def count_openflamingo(args) -> dict:
    from flamingo_dist.training.opcount import StepCounter

    if args.shape != "harness":
        raise SystemExit("error: OpenFlamingo is measured on --shape harness only")
    of = _bench_openflamingo()
    of.prepare(args.work)
    counter = StepCounter()
    # torch's defaults on a GPU (multi-tensor "foreach" AdamW and clipping): on the CPU they are
    # per-tensor loops, which is not what OpenFlamingo runs
    step, _, trainable = of.openflamingo(args.work, args.precision, args.openflamingo, [of.IMAGES] * of.BATCH, "cpu",
                                         phase=counter.phase, foreach=True)
    for _ in range(args.warmup):
        step()
    with counter:
        for _ in range(args.steps):
            step()
    return report(counter, args.steps, trainable=trainable)


def report(counter, steps: int, **extra) -> dict:
    per = {k: v / steps for k, v in counter.ops.items()}
    reads = {k: v / steps for k, v in counter.reads.items()}
    top = {phase: dict(names.most_common(12)) for phase, names in counter.op_names.items()}
    return {"operators_per_step": {p: per.get(p, 0.0) for p in ("forward", "backward", "rest")},
            "operators_forward_backward": per.get("forward", 0.0) + per.get("backward", 0.0),
            "host_reads_per_step": {p: reads.get(p, 0.0) for p in ("forward", "backward", "rest")},
            "host_read_sites": sorted({f"{phase}: {what} at {where}" for phase, what, where in counter.where}),
            "top_operators_per_phase": top, **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["harness", "3b-small", "debug"], default="harness")
    p.add_argument("--stacks", nargs="+", choices=["ours", "openflamingo"], default=["ours"])
    p.add_argument("--stage", type=int, choices=[1, 2, 3], default=2, help="our ZeRO stage (ds_configs/zeroN.json)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps counted (the figures are per step)")
    p.add_argument("--set", action="append", default=[], help="more config overrides of ours (key=value)")
    p.add_argument("--openflamingo", default=os.path.join(REPO, ".bench", "openflamingo"))
    p.add_argument("--work", default=os.path.join(REPO, ".bench", "work"))
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "openflamingo"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one stack per process: both set global state (dynamo, DeepSpeed, torch threads)
        result = count_ours(args) if args.worker == "ours" else count_openflamingo(args)
        print(json.dumps(result))
        return 0
    if "openflamingo" in args.stacks and not os.path.isdir(os.path.join(args.openflamingo, "open_flamingo")):
        print(f"error: --openflamingo {args.openflamingo}: no open_flamingo package there (make "
              ".bench/openflamingo/open_flamingo)", file=sys.stderr)
        return 2
    import subprocess

    results = {}
    for stack in args.stacks:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--shape", args.shape, "--stage",
               str(args.stage), "--precision", args.precision, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--openflamingo", args.openflamingo, "--work", args.work, *[f"--set={s}" for s in args.set]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        results[stack] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        ops, reads = r["operators_per_step"], r["host_reads_per_step"]
        print(f"{args.shape} {args.precision} {stack:12} operators/step: forward {ops['forward']:.0f}, backward "
              f"{ops['backward']:.0f}, rest {ops['rest']:.0f}; host reads/step: {sum(reads.values()):g} "
              f"({', '.join(f'{k} {v:g}' for k, v in reads.items() if v)})"
              + (f"; tensors {r['tensors']}" if "tensors" in r else ""))
        for site in r["host_read_sites"][:8]:
            print(f"    read {site}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "stage": args.stage, "precision": args.precision, "steps": args.steps,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
