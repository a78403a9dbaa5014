"""Training-step speed of flamingo_dist against OpenFlamingo on the same model, in the same run.

Both stacks train the same Flamingo shape on the same batch: an open_clip ViT 256 wide, 4 layers,
patch 32 at 224 px (`flamingo-bench-vit`); a LLaMA 512 wide, 8 layers, 8 heads, SwiGLU 1536,
vocabulary 8192 (the same weights for both, saved once as a Hugging Face directory); a
Perceiver Resampler of depth 6 with 64 latents (8 heads x 64); cross-attention every 2 layers;
4 sequences x 256 tokens x 3 images. Each is frozen as it freezes itself: OpenFlamingo trains its
resampler, its cross-attention blocks and the LM's whole input embedding
(`create_model_and_transforms`), we train the resampler, the blocks and the decoupled
embeddings of the two new tokens. A step is forward, backward, gradient clipping at 1.0 and
AdamW: ours through the DeepSpeed engine (ZeRO-2, one process), OpenFlamingo's as its train loop
does it. bf16: ours frozen weights in bf16 with fp32 master weights (train.precision bf16);
OpenFlamingo under `torch.autocast("cpu", bfloat16)`, the CPU form of its `amp_bf16` (its own
autocast is CUDA's). Inputs as each pipeline delivers them: uint8 pixels normalised in our step,
normalised floats for OpenFlamingo.

The stacks alternate in separate processes (`--pairs` rounds, the order reversed every round),
so all see the same machine state; each process times `--steps` steps after `--warmup`. FLOPs of
one forward+backward are counted for each with torch's FlopCounterMode; page faults (pages first
touched) per timed step with getrusage. `--images-per-row 3 2 1 0` gives rows fewer images than
slots (the rest zero padding, as packed batches have); the stack
`ours-encode-all` is ours encoding every slot, padding included (the ablation of
`Flamingo.skip_padding_media`); `ours-unmap-freed` is ours with glibc's default allocator settings
(`train.cpu_keep_freed_memory=false`, the ablation of keeping freed host memory); `ours-compiled`
is ours with `train.compile=true` (compilation happens in the warm-up steps, not timed).

`--profile` adds, per process, torch's profiler over `--profile-steps` more steps: each step's
operator time split into matrix products (mm, addmm, bmm, ...), attention (SDPA, softmax,
FlexAttention) and everything else, and then the ceiling this sets: OpenFlamingo's median step
over our matrix-product time, the ratio ours would reach if everything but its matrix products
took no time at all.

`--device cuda` runs both on the GPU (the default when one is visible): OpenFlamingo under
`torch.autocast("cuda", bfloat16)`, its `amp_bf16`; peak GPU memory per step is reported. `--device
cpu` hides the GPU from the workers.

OpenFlamingo is not a dependency: install it into a folder of its own and point --openflamingo
at it (`make bench-openflamingo` does both):

    pip install --no-deps --target .bench/openflamingo open-flamingo einops einops-exts
    python tools/bench_openflamingo.py --openflamingo .bench/openflamingo --precision fp32 bf16 \\
        --pairs 5 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shapes both stacks train (--shape). IMAGE_AT: where each image's <image> token sits; its
# text runs to the next one. LM_DTYPE: how the shared LM is saved (OpenFlamingo loads it so).
SHAPES = {
    "small": dict(VISION="flamingo-bench-vit",
                  LM=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, max_position_embeddings=512),
                  BATCH=4, SEQ=256, IMAGES=3, IMAGE_SIZE=224, IMAGE_AT=(5, 90, 170), INTERVAL=2, LM_DTYPE="float32"),
    # the 3b flavor's model: ViT-L-14 at 224 px, a 24-layer 2048-wide LLaMA, cross-attention before
    # every layer; the batch of the GPU measurements of issue 18 (8 x 256 tokens, 5 images)
    "3b": dict(VISION="ViT-L-14",
               LM=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, max_position_embeddings=512),
               BATCH=8, SEQ=256, IMAGES=5, IMAGE_SIZE=224, IMAGE_AT=(5, 55, 105, 155, 205), INTERVAL=1,
               LM_DTYPE="bfloat16"),
}
SHAPE = "small"
VISION, LM, BATCH, SEQ, IMAGES, IMAGE_SIZE, IMAGE_AT, INTERVAL, LM_DTYPE = (SHAPES[SHAPE][k] for k in (
    "VISION", "LM", "BATCH", "SEQ", "IMAGES", "IMAGE_SIZE", "IMAGE_AT", "INTERVAL", "LM_DTYPE"))
LATENTS, DEPTH, HEADS, HEAD_DIM = 64, 6, 8, 64  # OpenFlamingo's resampler (its fixed heads and head width)
LR = 1e-4


def use_shape(name: str) -> None:
    """Make `name` the shape every function here builds."""
    global SHAPE
    SHAPE = name
    globals().update(SHAPES[name])


def default_work(shape: str) -> str:
    return os.path.join(REPO, ".bench", "work" if shape == "small" else f"work-{shape}")
# our variants: config overrides of each (ours-encode-all is a model switch, set in `ours`)
OURS = {"ours": [], "ours-encode-all": [], "ours-unmap-freed": ["train.cpu_keep_freed_memory=false"],
        "ours-compiled": ["train.compile=true"]}
STACKS = ("openflamingo", *OURS)
# operator names (self time) counted as matrix products and as attention by --profile
# (the ViT's patch embedding is a convolution; mkldnn's fused linear is what inductor may call on CPU)
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
                        "aten::mkldnn_convolution", "mkldnn::_linear_pointwise"})
ATTENTION_MARKS = ("scaled_dot_product", "softmax", "flex_attention")


def prepare(work: str) -> None:
    """The shared frozen weights: a random LLaMA (+ word tokenizer) and a random ViT, once (drawn
    on the GPU when there is one: the 3b shape's 1.6B parameters take minutes on a CPU)."""
    import torch

    if os.path.isfile(os.path.join(work, "DONE")):
        return
    import open_clip
    from transformers import LlamaConfig, LlamaForCausalLM

    from flamingo_dist.data.synthetic import build_tokenizer
    from flamingo_dist.models.vision import register_model_config

    os.makedirs(work, exist_ok=True)
    tok = build_tokenizer(os.path.join(work, "llama"), LM["vocab_size"])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        lm = LlamaForCausalLM(LlamaConfig(**LM, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
    lm.to(getattr(torch, LM_DTYPE)).save_pretrained(os.path.join(work, "llama"))
    del lm
    register_model_config(VISION)
    torch.save(open_clip.create_model(VISION, device=device).state_dict(), os.path.join(work, "vit.pt"))
    open(os.path.join(work, "DONE"), "w").close()


def token_ids(image_id: int, around_id: int | None, end_of_chunk_id: int | None, per_row: list[int]):
    """The batch's token ids, the same text in both stacks: random words, row r's first
    per_row[r] images where IMAGE_AT says. Ours: `<fake><image><fake>` (IDEFICS' layout);
    OpenFlamingo: `<image>`, and `<|endofchunk|>` closing each image's text."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, LM["vocab_size"] - 10, (BATCH, SEQ), generator=g)
    ids[:, 0] = 1
    for r, n in enumerate(per_row):
        for k, p in enumerate(IMAGE_AT[:n]):
            ids[r, p] = image_id
            if around_id is not None:
                ids[r, p - 1] = ids[r, p + 1] = around_id
            if end_of_chunk_id is not None:
                end = IMAGE_AT[k + 1] - 1 if k + 1 < len(IMAGE_AT) else SEQ - 1
                ids[r, end] = end_of_chunk_id
    return ids


def pixels_uint8(per_row: list[int]):
    """Random images; slots past a row's image count are zeros (padding)."""
    import torch

    g = torch.Generator().manual_seed(1)
    px = torch.randint(0, 256, (BATCH, IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)
    for r, n in enumerate(per_row):
        px[r, n:] = 0
    return px


class OneBatchFeed:
    """A data feed that hands our trainer the same micro-batch every time (Trainer.build(feed=))."""

    def __init__(self, batch: dict, micro_batch_size: int):
        from flamingo_dist.data.pipeline import Source

        self.sources = [Source("main", "obelics", [], 1.0, micro_batch_size)]
        self.batch, self.error = batch, None

    def step_batches(self, accum: int) -> list:
        return [(self.sources[0], self.batch) for _ in range(accum)]

    def counters(self) -> dict:
        return {}


def harness_batch(per_row: list[int]) -> dict:
    """The batch in our layout, through the loader's collate (media slots, host numbers)."""
    import torch

    from flamingo_dist.data.layout import image_attention_mask, labels_for
    from flamingo_dist.data.processing import collate

    V = LM["vocab_size"]
    ids = token_ids(V + 1, V, None, per_row)
    mask = image_attention_mask(ids, V + 1, 2, IMAGES)
    labels = labels_for(ids, torch.ones_like(ids), V + 1, V)
    px = pixels_uint8(per_row)
    rows = [{"input_ids": ids[r], "labels": labels[r], "attention_mask": torch.ones_like(ids[r]), "pixel_values": px[r],
             "image_attention_mask": mask[r], "position_ids": torch.arange(SEQ), "num_images": torch.tensor(n),
             "num_documents": torch.tensor(1)} for r, n in enumerate(per_row)]
    return collate(rows)


def ours_trainer(work: str, precision: str, per_row: list[int], sets=(), stage: int = 2):
    """Our trainer on this shape, fed the one harness batch: its train_step is our whole step."""
    from flamingo_dist.config.load import load_config
    from flamingo_dist.distributed.groups import init_distributed
    from flamingo_dist.training.trainer import Trainer

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", os.environ.get("BENCH_PORT", "29741"))):
        os.environ.setdefault(key, value)
    layout = init_distributed(1)  # the GPU when the worker sees one (run_one hides it for --device cpu)
    cfg = load_config(None, [
        "model.synthetic_backbones=null", f"model.lm.path={work}/llama", f"model.vision.model_name={VISION}",
        f"model.vision.pretrained={work}/vit.pt", f"model.resampler.depth={DEPTH}",
        f"model.resampler.num_latents={LATENTS}", f"model.resampler.num_heads={HEADS}",
        f"model.resampler.head_dim={HEAD_DIM}", f"model.xattn.cross_layer_interval={INTERVAL}",
        f"data.seq_len={SEQ}", f"data.max_images={IMAGES}", f"data.image_size={IMAGE_SIZE}",
        f"train.micro_batch_size={BATCH}", f"train.precision={precision}", f"train.lr={LR}", "train.warmup_steps=0",
        f"data.tokenizer={work}/llama", "tracking.mlflow=false", f"tracking.run_dir={work}/run",
        "train.log_every=1000000", *sets])
    feed = OneBatchFeed(harness_batch(per_row), BATCH)
    return Trainer(cfg, os.path.join(REPO, "ds_configs", f"zero{stage}.json"), layout).build(track=False, feed=feed)


def ours(work: str, precision: str, per_row: list[int], encode_all: bool = False, sets: tuple[str, ...] = ()):
    """(step function, flop-counted forward+backward, trainable parameters) of our stack."""
    trainer = ours_trainer(work, precision, per_row, sets)
    trainer.model.skip_padding_media = not encode_all

    def forward_backward():  # for the FLOP count only (the process ends after it)
        loss, _ = trainer._forward(trainer.feed.batch)
        trainer.engine.backward(loss)
        return loss

    def step():
        return trainer.train_step()["loss"]

    return step, forward_backward, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def openflamingo(work: str, precision: str, of_path: str, per_row: list[int], device: str, phase=None,
                 foreach: bool | None = None):
    """(step function, flop-counted forward+backward, trainable parameters) of OpenFlamingo's
    training step. `phase(name)`: a context around its forward and its backward (operator
    counts); `foreach`: its AdamW and clipping as multi-tensor kernels (torch's default on a GPU)."""
    import contextlib

    import torch

    sys.path.insert(0, os.path.abspath(of_path))
    from open_flamingo import create_model_and_transforms

    from flamingo_dist.data.processing import normalize_pixels
    from flamingo_dist.models.vision import register_model_config

    register_model_config(VISION)
    model, _, tok = create_model_and_transforms(VISION, f"{work}/vit.pt", f"{work}/llama", f"{work}/llama",
                                                cross_attn_every_n_layers=INTERVAL, use_local_files=True)
    model.to(device).train()
    image_id, eoc_id = tok.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    ids = token_ids(image_id, None, eoc_id, per_row)
    labels = ids.clone()
    labels[labels == image_id] = -100  # as its train loop does (padding: none here)
    vision_x = normalize_pixels(pixels_uint8(per_row).to(device))[:, :, None]  # [B, T_img, F=1, C, H, W]
    ids, labels = ids.to(device), labels.to(device)
    attention = torch.ones_like(ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.1, foreach=foreach)
    autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    phase = phase or (lambda name: contextlib.nullcontext())

    def forward_backward():
        with phase("forward"), autocast():
            loss = model(vision_x=vision_x, lang_x=ids, attention_mask=attention, labels=labels)[0]
        with phase("backward"):
            loss.backward()
        return loss

    def step():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, forward_backward, sum(p.numel() for p in trainable)


def worker(args) -> dict:
    """One stack in this process: warm-up, timed steps, FLOPs of one forward+backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    if args.stack in OURS:
        step, forward_backward, trainable = ours(args.work, args.one_precision, args.images_per_row,
                                                 args.stack == "ours-encode-all", OURS[args.stack])
    else:
        step, forward_backward, trainable = openflamingo(args.work, args.one_precision, args.openflamingo,
                                                         args.images_per_row, args.device)
    losses = [step() for _ in range(args.warmup)]
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, faults = [], []
    for _ in range(args.steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        losses.append(step())  # .item(): the step's kernels have finished
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)  # pages first touched
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    profiled = profile_steps(step, args.profile_steps) if args.profile else None
    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    return {"stack": args.stack, "precision": args.one_precision, "step_times_s": times, "page_faults": faults,
            "losses": losses, "op_ms_per_step": profiled, "device": args.device, "peak_memory_gib": peak_gib,
            "flops_per_step": counter.get_total_flops(), "trainable_parameters": trainable}


def op_time_breakdown(events, steps: int) -> dict:
    """Self CPU time per step in ms, split into `matmul`, `attention` and `other`, from
    (operator name, self time in us) pairs such as torch.profiler's key_averages(). `total` is
    their sum: operator time, a little below the step's wall time (Python between operators)."""
    out = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, self_us in events:
        kind = ("matmul" if name in MATMUL_OPS else
                "attention" if any(m in name for m in ATTENTION_MARKS) else "other")
        out[kind] += self_us / 1e3 / steps
    out["total"] = sum(out.values())
    return out


def profile_steps(step, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return op_time_breakdown(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), steps)


def run_one(args, stack: str, precision: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--one-precision", precision, "--work",
           args.work, "--shape", args.shape, "--openflamingo", args.openflamingo, "--warmup", str(args.warmup),
           "--steps", str(args.steps),
           "--images-per-row", *map(str, args.images_per_row), *(["--profile"] if args.profile else []),
           "--profile-steps", str(args.profile_steps), "--device", args.device]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{stack} {precision} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    out = {}
    for precision in sorted({r["precision"] for r in runs}):
        entry: dict = {}
        for stack in sorted({r["stack"] for r in runs}):
            mine = [r for r in runs if r["stack"] == stack and r["precision"] == precision]
            rates = [BATCH / statistics.median(r["step_times_s"]) for r in mine]  # per process: its median step
            entry[stack] = {"samples_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
                            "tokens_per_s_median": statistics.median(rates) * SEQ,
                            "step_time_s_median": BATCH / statistics.median(rates),
                            "page_faults_per_step_median": statistics.median(
                                statistics.median(r["page_faults"]) for r in mine),
                            "flops_per_step": mine[0]["flops_per_step"],
                            "trainable_parameters": mine[0]["trainable_parameters"], "processes": len(mine)}
            if mine[0].get("peak_memory_gib") is not None:
                entry[stack]["peak_memory_gib_max"] = max(r["peak_memory_gib"] for r in mine)
            if mine[0].get("op_ms_per_step"):
                entry[stack]["op_ms_per_step_median"] = {
                    k: statistics.median(r["op_ms_per_step"][k] for r in mine) for k in mine[0]["op_ms_per_step"]}
        for stack in entry.copy():
            if stack != "ours" and "ours" in entry:
                entry[f"ratio_ours_over_{stack}"] = (entry["ours"]["samples_per_s"]["median"]
                                                     / entry[stack]["samples_per_s"]["median"])
            if stack.startswith("ours-") and "openflamingo" in entry:
                entry[f"ratio_{stack}_over_openflamingo"] = (entry[stack]["samples_per_s"]["median"]
                                                             / entry["openflamingo"]["samples_per_s"]["median"])
            if (stack.startswith("ours") and "openflamingo" in entry
                    and "op_ms_per_step_median" in entry[stack]):  # ours with nothing but its matrix products
                entry[f"ceiling_{stack}_over_openflamingo"] = (
                    entry["openflamingo"]["step_time_s_median"] * 1e3 / entry[stack]["op_ms_per_step_median"]["matmul"])
        out[precision] = entry
    return out


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()  # the package's messages (progress, resume, backbones) on rank 0
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--shape", choices=sorted(SHAPES), default="small")
    use_shape(shape.parse_known_args(argv)[0].shape)  # the batch size shapes the arguments below
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[shape])
    p.add_argument("--openflamingo", default=os.path.join(REPO, ".bench", "openflamingo"),
                   help="folder holding the open_flamingo package")
    p.add_argument("--work", help="shared weights go here (default .bench/work, .bench/work-<shape>)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--stacks", nargs="+", default=["ours", "openflamingo"], choices=STACKS)
    p.add_argument("--images-per-row", nargs=BATCH, type=int, default=[IMAGES] * BATCH,
                   help=f"images used in each of the {BATCH} rows (0-{IMAGES}; the other slots are padding)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where both stacks train (default: cuda when visible)")
    p.add_argument("--profile", action="store_true",
                   help="split each stack's step into matrix products, attention and the rest (torch.profiler) "
                        "and report the ratio ours would reach with nothing but its matrix products")
    p.add_argument("--profile-steps", type=int, default=2, help="steps profiled per process (after the timed ones)")
    p.add_argument("--out", help="write every measurement and the summary as JSON here")
    p.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--one-precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work or default_work(args.shape)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and args.profile:
        print("error: --profile splits CPU operator time; it has no meaning with --device cuda", file=sys.stderr)
        return 2
    if any(not 0 <= n <= IMAGES for n in args.images_per_row):
        print(f"error: --images-per-row: each count must be in 0..{IMAGES}", file=sys.stderr)
        return 2
    if "openflamingo" in args.stacks and not os.path.isdir(os.path.join(args.openflamingo, "open_flamingo")):
        print(f"error: --openflamingo {args.openflamingo}: no open_flamingo package there (pip install --no-deps "
              f"--target {args.openflamingo} open-flamingo einops einops-exts)", file=sys.stderr)
        return 2
    if args.worker:
        args.stack = args.worker
        print(json.dumps(worker(args)))
        return 0
    if args.out:  # made now, not found missing after the whole run
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    prepare(args.work)
    runs = []
    for precision in args.precision:
        for pair in range(args.pairs):
            order = args.stacks if pair % 2 == 0 else args.stacks[::-1]
            for stack in order:
                r = run_one(args, stack, precision)
                runs.append(r)
                print(f"{precision} pair {pair + 1}/{args.pairs} {stack:12} median step "
                      f"{statistics.median(r['step_times_s']):.3f} s", flush=True)
    summary = summarize(runs)
    for precision, e in summary.items():
        for stack in args.stacks:
            r = e[stack]
            print(f"{precision} {stack:15} {r['samples_per_s']['median']:.2f} samples/s "
                  f"({r['samples_per_s']['min']:.2f}-{r['samples_per_s']['max']:.2f}), "
                  f"{r['flops_per_step'] / 1e9:.0f} GFLOP/step, {r['trainable_parameters'] / 1e6:.1f}M trainable, "
                  f"{r['page_faults_per_step_median']:.0f} page faults/step"
                  + (f", peak {r['peak_memory_gib_max']:.2f} GiB on the GPU" if "peak_memory_gib_max" in r else ""))
            if "op_ms_per_step_median" in r:
                ms = r["op_ms_per_step_median"]
                print(f"{precision} {stack:15} operators per step: matmul {ms['matmul']:.0f} ms, attention "
                      f"{ms['attention']:.0f} ms, other {ms['other']:.0f} ms (total {ms['total']:.0f} ms)")
        for key, value in e.items():
            if key.startswith(("ratio_", "ceiling_")):
                print(f"{precision} {key}: x{value:.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"summary": summary, "runs": runs, "shape": {"name": SHAPE, "lm": LM, "vision": VISION, "batch": BATCH,
                                                                    "seq": SEQ, "images": IMAGES,
                                                                    "images_per_row": args.images_per_row},
                       "device": args.device}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
