"""Capacity planner: which layouts of a flavor fit a cluster, what each holds per GPU, what it
sends per step, and how fast it should run (tools/plan.py prints it; docs/scaling.md uses it).

Everything comes from the model itself, built on the meta device at each tensor-parallel size
under a fake process group (no memory, no communication, a second or two at 80b):
- parameters: every tensor's per-rank shape, frozen or trainable, and the optimizer's groups;
- activations: one forward of a micro-batch of one sequence on meta tensors, counting the bytes of
  every tensor autograd saves for backward (parameters excluded), with activation checkpointing
  off and on; every saved tensor has the micro-batch as its leading dimension, so the bytes of a
  micro-batch of B are B times that. With checkpointing the backward recomputes one unit at a
  time: the largest unit's own activations are added;
- the DeepSpeed buffers from the DeepSpeed config (bucket sizes, ZeRO-3 thresholds as
  training/engine.py fills them).

Memory per GPU is split as the issue asks: frozen weights, trainable weights (the compute copy in
the training precision, plus DeepSpeed's fp32 master partition), gradients, optimizer state (Adam's
two fp32 moments, partitioned), activations, buffers; the peak is the largest of three moments of a
step: the end of the forward, the backward (activations still held, gradients and reduction
buckets arriving) and the optimizer step (DeepSpeed's fp32 gradient partition beside the bit16 one).
The model of each moment was checked against tensor accounting of real steps
(training/memcount.py; tests/test_plan.py) and, on a GPU, against `torch.cuda.max_memory_allocated`.

Bytes per collective per optimizer step follow what DeepSpeed 0.19.8 and our trainer call (checked
exactly against flamingo_dist/distributed/commcount.py on gloo): gradient reduction, the
all-gather of the updated parameters, ZeRO-3's parameter gathers, the tensor-parallel all-reduces
of the model, and the step's one read. Step time = compute (frozen-aware FLOPs, models/flops.py,
at the given MFU) + communication that is not hidden (ring algorithms at the bandwidth of the
slowest link a group spans; gradient reductions overlap the backward when `overlap_comm` is on,
ZeRO-3's gathers are prefetched; TP all-reduces and the parameter all-gather after the step are
not hidden). Times are predictions; memory and bytes are what a run does.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from flamingo_dist.config.schema import ConfigError, JobConfig

GIB = 2**30
_BYTES = {"bf16": 2, "fp32": 4}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What the planner plans for. Bandwidths are the bus bandwidth a collective reaches per GPU
    (what nccl-tests calls busbw), in GB/s."""
    gpus: int
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    intra_node_gbs: float = 360.0
    inter_node_gbs: float = 45.0
    peak_tflops: float = 989.0
    mfu: float = 0.40
    reserve_gib: float = 4.0  # CUDA context, NCCL's buffers, the allocator's fragmentation
    hbm_gbs: float = 3350.0  # memory bandwidth (the optimizer's update is bound by it)
    backend: str = "nccl"

    def __post_init__(self):
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--gpus ({self.gpus}) and --gpus-per-node ({self.gpus_per_node}) must be positive")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ConfigError(f"--gpus {self.gpus} is not a whole number of nodes of {self.gpus_per_node}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu {self.mfu} must be in (0, 1]")
        if self.backend not in ("nccl", "gloo"):
            raise ConfigError(f"--backend {self.backend!r}: nccl (GPU clusters) or gloo")


# H100 / H200 SXM nodes of 8: NVLink 4 (450 GB/s per direction; ~360 GB/s all-reduce busbw in
# nccl-tests), one 400 Gb/s InfiniBand NIC per GPU (~45 GB/s busbw), 989 dense bf16 TFLOP/s.
GPU_PRESETS = {
    "h100": {"gpu_memory_gib": 80.0, "intra_node_gbs": 360.0, "inter_node_gbs": 45.0, "peak_tflops": 989.0,
             "hbm_gbs": 3350.0},
    "h200": {"gpu_memory_gib": 141.0, "intra_node_gbs": 360.0, "inter_node_gbs": 45.0, "peak_tflops": 989.0,
             "hbm_gbs": 4800.0},
}


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    zero: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool

    def describe(self) -> str:
        return (f"TP{self.tp} x DP{self.dp} ZeRO-{self.zero} mb{self.micro_batch} x ga{self.grad_accum} "
                f"AC {'on' if self.activation_checkpointing else 'off'}")


@dataclasses.dataclass
class Plan:
    layout: Layout
    memory: dict[str, float]  # bytes per GPU at the peak, by kind
    moments: dict[str, float]  # bytes per GPU at each moment of the step
    comm: dict[str, float]  # bytes this rank contributes per optimizer step, by collective
    step_s: float
    tokens_per_s: float
    fits: bool

    @property
    def peak(self) -> float:
        return max(self.moments.values())


# --------------------------------------------------------------------------- the model's shapes


@contextlib.contextmanager
def fake_tp_world(tp: int):
    """A process group of `tp` ranks in which this process is rank 0, and megatron's TP groups on
    it, that moves nothing (torch's fake backend): what building a TP-sharded model on the meta
    device needs. Refuses to run inside a real distributed job (it replaces the global groups)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the capacity planner builds its own (fake) process groups: "
                           "run it outside a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        yield parallel_state.get_tensor_model_parallel_group()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@dataclasses.dataclass
class ModelProfile:
    """One TP size's view of the model, per TP rank."""
    tp: int
    frozen: int  # elements
    trainable: int
    trainable_groups: list[int]  # elements per optimizer group (optim.param_groups)
    trainable_numels: list[int]  # elements of each trainable tensor
    largest_block: int  # ZeRO-3: the most trainable elements one module call gathers
    zero3_thresholds: dict[str, int]
    act_per_sample: dict[bool, float]  # saved bytes per sequence, by activation checkpointing
    tp_comm_per_sample: dict[bool, dict]  # the model's collectives per sequence (forward + backward), by AC
    unit_per_sample: float  # the largest unit's own saved bytes per sequence (recomputed under AC)
    logits_per_sample: float  # one fp32 copy of this rank's logits per sequence
    vocab_shard: int
    seq_len: int
    images: int
    flops_per_sample: float

    def persistence_threshold(self, zs: "ZeroSettings") -> int:
        if zs.persistence_threshold is None:
            return self.zero3_thresholds["stage3_param_persistence_threshold"]
        return zs.persistence_threshold

    def prefetch_bucket(self, zs: "ZeroSettings") -> int:
        if zs.prefetch_bucket is None:
            return self.zero3_thresholds["stage3_prefetch_bucket_size"]
        return zs.prefetch_bucket

    def zero3_shards(self, zs: "ZeroSettings", dp: int) -> dict[str, int]:
        """ZeRO-3, elements per rank: "gathered", the shards of the parameters gathered for each
        use (each parameter padded to a multiple of DP, as DeepSpeed partitions it; those up to
        the persistence threshold stay whole on every rank: "persistent"); "all", the shards of
        every trainable (all of whose gradients are reduce-scattered)."""
        threshold = self.persistence_threshold(zs)
        return {"gathered": sum(_ceil_div(n, dp) for n in self.trainable_numels if n > threshold),
                "persistent": sum(n for n in self.trainable_numels if n <= threshold),
                "all": sum(_ceil_div(n, dp) for n in self.trainable_numels)}

    def zero3_kept(self, zs: "ZeroSettings") -> bool:
        """Whether ZeRO-3 keeps every gathered parameter from its forward use to its backward use
        (DeepSpeed releases a parameter only when more than `stage3_max_live_parameters` are live
        or its next use is further than `stage3_max_reuse_distance` elements away): then each
        micro-batch gathers them once, and they are all whole during forward and backward."""
        threshold = self.persistence_threshold(zs)
        gathered = sum(n for n in self.trainable_numels if n > threshold)
        return gathered <= min(zs.max_live_parameters, zs.max_reuse_distance)


class _FusedAttention(torch.autograd.Function):
    """What the fused attention kernels (flash and memory-efficient on a GPU, flash on the CPU)
    save for backward: queries, keys, values, the output, the fp32 log-sum-exp per query and the
    mask when there is one. On the meta device SDPA falls back to the math path, which saves the
    fp32 attention probabilities (~1.8 GiB of 3b's 8 x 256 activations that no kernel keeps)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(q, k, v, attn_mask)


def _trace(model, args, kwargs) -> tuple[float, dict]:
    """One forward and backward on meta tensors: (bytes autograd saves in the forward, parameters
    excluded; the collectives of forward and backward as flamingo_dist/distributed/commcount.py
    summarises them: the model's tensor-parallel ones)."""
    from flamingo_dist.distributed.commcount import CollectiveCounter

    params = {id(p.untyped_storage()) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if id(st) not in params:
            seen[id(st)] = st.nbytes()
        return st, t  # keeps the storage alive: ids stay unique for the whole forward

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        with CollectiveCounter() as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed[1]):
                loss, _ = model(*args, **kwargs)
            saved = float(sum(seen.values()))
            loss.backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return saved, counter.summary()


_VISION_TOWERS: dict = {}


def _meta_vision(cfg):
    """The config's vision tower on the meta device (built once per process: the same at every TP)."""
    from flamingo_dist.models.vision import build_vision_encoder

    key = (cfg.vision.model_name, cfg.vision.activation)
    if key not in _VISION_TOWERS:
        with torch.device("meta"):
            _VISION_TOWERS[key] = build_vision_encoder(key[0], None, key[1], device="meta")
    return _VISION_TOWERS[key]


class _VisionShape(torch.nn.Module):
    """The frozen vision tower without running it: it runs without autograd, so it saves nothing
    for backward and sends nothing (tracing ViT-H took most of the planner's time); its output
    has the tower's shape."""

    def __init__(self, tower, dtype: torch.dtype):
        super().__init__()
        shape = tower.shape()
        self.tokens = (shape["image_size"] // shape["patch_size"]) ** 2 + 1
        self.width, self.image_size, self.dtype = tower.width, tower.image_size, dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.new_zeros(pixels.shape[0], self.tokens, self.width, dtype=self.dtype)


def _meta_model(cfg, group, dtype, vision):
    """The model of `cfg` around `vision` on the meta device, frozen as in training, every
    tensor in the dtype DeepSpeed holds its compute copy in."""
    from flamingo_dist.training.build import assemble_model
    from flamingo_dist.training.engine import apply_freeze

    model = assemble_model(cfg, vision, group, dtype)
    apply_freeze(model)
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = torch.empty_like(p, dtype=dtype)
    return model


def _combine(parts: list[tuple[float, dict | float]]):
    """sum of coefficient x value, for numbers and for commcount summaries."""
    if not isinstance(parts[0][1], dict):
        return sum(c * v for c, v in parts)
    out: dict = {}
    for c, summary in parts:
        for key, entry in summary.items():
            e = out.setdefault(key, {"calls": 0, "bytes": 0})
            e["calls"] += c * entry["calls"]
            e["bytes"] += c * entry["bytes"]
    return {k: v for k, v in out.items() if v["calls"] or v["bytes"]}


def profile_model(job: JobConfig, tp: int) -> ModelProfile:
    """Build `job`'s model at TP size `tp` on the meta device and measure it.

    The parameters come from the whole model. Activations and the model's collectives come from
    three models of one or two units (a unit: an LM layer with or without a cross-attention
    block before it), traced forward and backward: every unit of a kind saves and sends the same,
    so A = rest + x, B = rest + 2x, C = rest + x + p give the whole model's rest + n_x x + (L - n_x) p
    exactly, in a fraction of a second at any depth (tracing 80b's 80 layers took ~12 s per TP size)."""
    from flamingo_dist.config.schema import xattn_layer_indices
    from flamingo_dist.models.flops import train_flops
    from flamingo_dist.models.lm import padded_vocab_size
    from flamingo_dist.training.engine import zero3_thresholds
    from flamingo_dist.training.optim import param_groups

    cfg = job.model
    if cfg.init_from:
        raise ConfigError("model.init_from: the planner builds the model from its shape fields "
                          "(model.vision.model_name and model.lm), not from a checkpoint: clear init_from")
    lm = cfg.lm
    if lm.num_heads % tp or lm.kv_heads % tp or lm.intermediate_size % tp:
        raise ConfigError(f"TP size {tp} does not divide the LM's heads ({lm.num_heads}), key/value heads "
                          f"({lm.kv_heads}) and MLP width ({lm.intermediate_size})")
    dtype = torch.bfloat16 if job.train.precision == "bf16" else torch.float32
    B, T, N = 1, job.data.seq_len, job.data.max_images
    n_x, L = len(xattn_layer_indices(cfg)), lm.num_layers
    with fake_tp_world(tp) as group, torch.device("meta"):
        tower = _meta_vision(cfg).to(dtype)
        model = _meta_model(cfg, group, dtype, tower)
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        numels = [p.numel() for p in trainable_params]
        groups = [sum(p.numel() for p in g["params"]) for g in param_groups(model, job.train.weight_decay,
                                                                          job.train.lr_scales)]
        thresholds = zero3_thresholds(model)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
                      if any(p.requires_grad for p in m.parameters(recurse=False)))
        shape = tower.shape()
        del model
        S = job.data.image_size
        inputs = (torch.zeros(B, T, dtype=torch.long), torch.zeros(B, N, 3, S, S, dtype=dtype),
                  torch.ones(B, T, N, dtype=torch.long))
        kwargs = {"labels_BT": torch.zeros(B, T, dtype=torch.long), "media_slots_M": torch.arange(B * N)}
        traces = {}
        for name, layers, blocks in (("A", 1, [0]), ("B", 2, [0, 1]), ("C", 2, [0])):
            small = dataclasses.replace(cfg, lm=dataclasses.replace(lm, num_layers=layers),
                                        xattn=dataclasses.replace(cfg.xattn, placement="explicit", layers=blocks))
            model = _meta_model(small, group, dtype, _VisionShape(tower, dtype))
            for ac in (False, True):
                for layer in model.layers:
                    layer.activation_checkpointing = ac
                traces[name, ac] = _trace(model, inputs, kwargs)
    act, comm, unit = {}, {}, {}
    for ac in (False, True):
        (a, ca), (b, cb), (c, cc) = traces["A", ac], traces["B", ac], traces["C", ac]
        # x = B - A, p = C - A, rest = A - x = 2A - B: whole = rest + n_x x + (L - n_x) p
        coef = {"A": 2 - n_x - (L - n_x), "B": n_x - 1, "C": L - n_x}
        act[ac] = _combine([(coef["A"], a), (coef["B"], b), (coef["C"], c)])
        comm[ac] = _combine([(coef["A"], ca), (coef["B"], cb), (coef["C"], cc)])
        unit[ac] = max(b - a, (c - a) if L > n_x else 0.0)
    vocab_shard = padded_vocab_size(lm.vocab_size, tp) // tp
    return ModelProfile(
        tp=tp, frozen=frozen, trainable=sum(numels), trainable_groups=groups, trainable_numels=numels,
        largest_block=largest, zero3_thresholds=thresholds, act_per_sample=act, tp_comm_per_sample=comm,
        unit_per_sample=float(unit[False]), logits_per_sample=float(T * vocab_shard * 4),
        vocab_shard=vocab_shard, seq_len=T, images=N,
        flops_per_sample=train_flops(cfg, shape, 1, T, N, tp_size=1) / tp)


# --------------------------------------------------------------------------- DeepSpeed's settings


@dataclasses.dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed config's numbers that decide memory and messages (elements)."""
    reduce_bucket: int = int(2e8)
    allgather_bucket: int = int(2e8)
    overlap_comm: bool = True
    prefetch_bucket: int | None = None  # None: "auto" (training/engine.py zero3_thresholds)
    persistence_threshold: int | None = None
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)

    @classmethod
    def from_config(cls, ds: dict) -> "ZeroSettings":
        z = ds.get("zero_optimization", {})

        def number(key, default):
            value = z.get(key, default)
            return None if value == "auto" else int(float(value))

        stage = int(z.get("stage", 0))
        # DeepSpeed's defaults (deepspeed/runtime/zero/config.py): buckets 5e8, overlap on at ZeRO-3 only
        return cls(reduce_bucket=number("reduce_bucket_size", 5e8), allgather_bucket=number("allgather_bucket_size", 5e8),
                   overlap_comm=bool(z.get("overlap_comm", stage == 3)),
                   prefetch_bucket=number("stage3_prefetch_bucket_size", 5e7),
                   persistence_threshold=number("stage3_param_persistence_threshold", 1e5),
                   max_live_parameters=number("stage3_max_live_parameters", 1e9),
                   max_reuse_distance=number("stage3_max_reuse_distance", 1e9))


# --------------------------------------------------------------------------- memory


def memory(profile: ModelProfile, layout: Layout, zs: ZeroSettings, precision: str) -> tuple[dict, dict]:
    """(bytes per GPU at the peak by kind, bytes at each moment of the step)."""
    P = _BYTES[precision]
    d, B = layout.dp, layout.micro_batch
    W, F = profile.trainable, profile.frozen
    Wd = W / d
    largest_group = max(profile.trainable_groups) / d
    if layout.zero == 3:
        shards = profile.zero3_shards(zs, d)
        compute_copy = P * (shards["all"] + shards["persistent"])
    else:
        compute_copy = P * W
    static = {
        "frozen weights": P * F,
        "trainable weights": compute_copy + 4 * Wd,  # + DeepSpeed's fp32 master partition
        "optimizer state": 8 * Wd,  # Adam's two fp32 moments
    }
    act = B * profile.act_per_sample[layout.activation_checkpointing]
    if layout.activation_checkpointing:
        act += B * profile.unit_per_sample  # one unit recomputed at a time
    # the backward: the logits' fp32 gradient beside the activations, gradients arriving
    if layout.zero == 1:
        grads_bwd = P * W  # every gradient kept whole until the end-of-step reduction
        buffers_bwd = P * min(zs.reduce_bucket, W)
    elif layout.zero == 2:
        grads_bwd = P * Wd  # this rank's reduced partition
        buffers_bwd = P * min(zs.reduce_bucket, W) * (2 if zs.overlap_comm else 1)
    else:
        grads_bwd = 4 * Wd  # ZeRO-3's fp32 gradient partition
        if profile.zero3_kept(zs):  # every gathered parameter whole from its forward to its backward use
            buffers_bwd = P * (W - shards["persistent"])
        else:  # the module being run and the prefetched ones
            buffers_bwd = P * (profile.largest_block + min(profile.prefetch_bucket(zs), W))
    # the optimizer step: the bit16 gradient partition, its flat copy and the fp32 gradient
    # (training/zero_step.py: for each group in turn; the fp32 gradients stay until the update)
    grads_step = 4 * Wd + 2 * P * largest_group if layout.zero < 3 else 4 * Wd
    buffers_static = P * min(zs.reduce_bucket, W) if layout.zero == 3 else 0.0
    base = sum(static.values()) + buffers_static
    moments = {
        "forward": base + act,
        "backward": base + act + B * profile.logits_per_sample + grads_bwd + buffers_bwd,
        "step": base + grads_step,
    }
    peak_at = max(moments, key=moments.get)
    kinds = dict(static)
    kinds["gradients"] = {"forward": 0.0, "backward": grads_bwd, "step": grads_step}[peak_at]
    kinds["activations"] = {"forward": act, "backward": act + B * profile.logits_per_sample, "step": 0.0}[peak_at]
    kinds["buffers"] = buffers_static + (buffers_bwd if peak_at == "backward" else 0.0)
    return kinds, moments


# --------------------------------------------------------------------------- bytes per collective


def _add(out: dict, key: str, nbytes: float, calls: int = 1) -> None:
    entry = out.setdefault(key, {"calls": 0, "bytes": 0.0})
    entry["calls"] += calls
    entry["bytes"] += nbytes


def collectives(profile: ModelProfile, layout: Layout, zs: ZeroSettings, precision: str,
                num_sources: int = 1) -> dict[str, dict]:
    """Bytes this rank contributes per optimizer step, per collective and group size ("op/size",
    as flamingo_dist/distributed/commcount.py counts them: all-reduce the tensor, all-gather this
    rank's shard, reduce-scatter the whole input). `calls` are counted where they follow from the
    shapes alone (the model's and the step's own), else left at the number of distinct messages."""
    P = _BYTES[precision]
    d, tp, B, ga = layout.dp, layout.tp, layout.micro_batch, layout.grad_accum
    world = d * tp
    out: dict[str, dict] = {}
    # the model's tensor-parallel collectives, traced (megatron's cross-entropy all-reduces over a
    # TP group of one too): every message is proportional to the micro-batch
    for key, entry in profile.tp_comm_per_sample[layout.activation_checkpointing].items():
        _add(out, key, entry["bytes"] * B * ga, entry["calls"] * ga)
    if d > 1:
        # DeepSpeed 0.19.8 (stage_1_and_2.py average_tensor, stage3.py): groups are flattened and
        # padded to a multiple of 2 x DP (ZeRO-1/2), each ZeRO-3 parameter to a multiple of DP
        groups = [_ceil_div(g, 2 * d) * 2 * d for g in profile.trainable_groups]
        if layout.zero in (1, 2):
            # every gradient element all-reduced (ZeRO-2 in buckets as backward goes, every
            # micro-batch; ZeRO-1 once, at the end of the step); the updated partitions all-gathered
            reductions = ga if layout.zero == 2 else 1
            _add(out, f"all_reduce/{d}", P * profile.trainable * reductions, 0)
            _add(out, f"all_gather_into_tensor/{d}", P * sum(groups) // d, len(groups))
        else:
            # each micro-batch gathers the partitioned parameters in forward and, unless they were
            # kept, again in backward; the persistent ones are gathered once per step, after the
            # update; gradients are reduce-scattered as backward goes
            shards = profile.zero3_shards(zs, d)
            uses = 1 if profile.zero3_kept(zs) else 2
            _add(out, f"all_gather_into_tensor/{d}", P * (uses * ga * shards["gathered"]
                                                          + shards["all"] - shards["gathered"]), 0)
            _add(out, f"reduce_scatter_tensor/{d}", ga * P * shards["all"] * d, 0)
        _add(out, f"all_reduce/{d}", 4 * num_sources, 1)  # training/step.py account: labelled tokens per source
    if world > 1:
        # training/step.py read_step: the one read, with one float per rank (each rank's time outside
        # collectives: the straggler measure, there unless train.hang_timeout_s is 0)
        _add(out, f"all_reduce/{world}", 8 * (5 + 4 * num_sources + world), 1)
    return out


# --------------------------------------------------------------------------- time


def _wire_seconds(op: str, size: int, nbytes: float, gbs: float) -> float:
    """Ring algorithms (NCCL's for these sizes; gloo's ring too): an all-reduce sends 2(n-1)/n of
    the tensor, an all-gather (n-1) shards, a reduce-scatter (n-1)/n of its input."""
    if size <= 1 or nbytes == 0:
        return 0.0
    factor = {"all_reduce": 2 * (size - 1) / size, "all_gather_into_tensor": size - 1,
              "reduce_scatter_tensor": (size - 1) / size}.get(op, 2 * (size - 1) / size)
    return factor * nbytes / (gbs * 1e9)


def step_time(profile: ModelProfile, layout: Layout, cluster: Cluster, comm: dict, zero: ZeroSettings,
              recompute_factor: float = 4 / 3) -> dict[str, float]:
    """Seconds per optimizer step, by part (a prediction: see the module docstring)."""
    B, ga, d, tp = layout.micro_batch, layout.grad_accum, layout.dp, layout.tp
    compute = profile.flops_per_sample * B * ga / (cluster.peak_tflops * 1e12 * cluster.mfu)
    if layout.activation_checkpointing:
        compute *= recompute_factor  # the forward again, the usual 4/3
    multi_node = d * tp > cluster.gpus_per_node
    dp_gbs = cluster.inter_node_gbs if multi_node else cluster.intra_node_gbs
    tp_s = dp_hidden = dp_exposed = 0.0
    for key, entry in comm.items():
        op, size = key.rsplit("/", 1)
        size = int(size)
        if size == tp and size != d:  # the model's tensor-parallel collectives: inside a node
            tp_s += _wire_seconds(op, size, entry["bytes"], cluster.intra_node_gbs)
            continue
        seconds = _wire_seconds(op, size, entry["bytes"], dp_gbs)
        overlapped = (op == "all_reduce" and layout.zero == 2 and zero.overlap_comm) or layout.zero == 3
        if overlapped and entry["bytes"] > 1024:
            dp_hidden += seconds
        else:
            dp_exposed += seconds
    backward = compute * 2 / 3
    optimizer = 2 * 18 * profile.trainable / d / (cluster.hbm_gbs * 1e9)  # fp32 weights, grads, moments; bit16 copy
    parts = {"compute": compute, "tensor parallel": tp_s, "data parallel (exposed)": dp_exposed
             + max(0.0, dp_hidden - backward), "optimizer": optimizer}
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- plans


def plan_layout(profile: ModelProfile, layout: Layout, cluster: Cluster, zero: ZeroSettings, precision: str,
                num_sources: int = 1) -> Plan:
    kinds, moments = memory(profile, layout, zero, precision)
    comm = collectives(profile, layout, zero, precision, num_sources)
    times = step_time(profile, layout, cluster, comm, zero)
    tokens = layout.dp * layout.micro_batch * layout.grad_accum * profile.seq_len
    peak = max(moments.values())
    return Plan(layout=layout, memory=kinds, moments=moments, comm=comm, step_s=times["total"],
                tokens_per_s=tokens / times["total"],
                fits=peak + cluster.reserve_gib * GIB <= cluster.gpu_memory_gib * GIB)


def tp_sizes(job: JobConfig, cluster: Cluster) -> list[int]:
    """TP sizes inside one node that divide the GPUs, the heads and the MLP width."""
    lm = job.model.lm
    return [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node and cluster.gpus % t == 0
            and lm.num_heads % t == 0 and lm.kv_heads % t == 0 and lm.intermediate_size % t == 0]


def search(job: JobConfig, cluster: Cluster, zero: ZeroSettings, global_batch: int | None = None,
           micro_batches=(1, 2, 4, 8, 16, 32), stages=(1, 2, 3), profiles: dict | None = None) -> list[Plan]:
    """Every layout (TP, ZeRO stage, micro-batch, accumulation, activation checkpointing) on
    `cluster`, planned; sorted fitting first, then by tokens/s. `global_batch` (sequences per
    optimizer step): accumulation makes it up; None: no accumulation."""
    plans = []
    profiles = profiles if profiles is not None else {}
    for tp in tp_sizes(job, cluster):
        if tp not in profiles:
            profiles[tp] = profile_model(job, tp)
        dp = cluster.gpus // tp
        for mb in micro_batches:
            if global_batch is None:
                ga = 1
            elif global_batch % (dp * mb):
                continue
            else:
                ga = global_batch // (dp * mb)
            for stage in stages:
                for ac in (False, True):
                    layout = Layout(tp=tp, dp=dp, zero=stage, micro_batch=mb, grad_accum=ga, activation_checkpointing=ac)
                    plans.append(plan_layout(profiles[tp], layout, cluster, zero, job.train.precision))
    plans.sort(key=lambda p: (not p.fits, -p.tokens_per_s, p.peak))
    return plans
