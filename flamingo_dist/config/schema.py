"""Typed configuration: nested dataclasses, one docstring under every field.

YAML files and ``--set a.b=value`` overrides only select values; derived values (vocabulary
padding, head dim, placement of cross-attention blocks) are computed, never typed twice.
Loading and ``validate`` (every error at once, before any heavy import) are in load.py.
The docstrings are the documentation: ``tools/gen_config_docs.py`` renders them into
``docs/config.md`` and a test keeps that file current.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

LR_GROUPS = ("gates", "resampler", "xattn", "embeddings")  # the kinds of train.lr_scales (flamingo_dist/training/optim.py)
SYNTHETIC_KINDS = ("attributes", "binding")  # data.sources[].synthetic (flamingo_dist/data/synthetic.py KINDS)
DATA_FORMATS = ("obelics", "mmc4", "pairs", "video")  # what data.sources[].format names (flamingo_dist/data/formats.py)
# eval.synthetic_tasks: the synthetic suite (flamingo_dist/eval/tasks.py)
SYNTHETIC_TASKS = ("synthetic_captions", "synthetic_vqa_color", "synthetic_vqa_shape", "synthetic_memes",
                   "synthetic_shapes", "synthetic_binding", "synthetic_binding_shuffled")
OPT_IN_SYNTHETIC_TASKS = ("synthetic_binding", "synthetic_binding_shuffled")  # run only when named


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


@dataclass
class LMConfig:
    """The frozen LLaMA-family language model."""

    path: Optional[str] = None
    """Hugging Face LLaMA-style checkpoint directory (config.json, safetensors, tokenizer). When
    set, the shape fields below are taken from its config.json (a differing value given here is
    reported and replaced); when unset, the LM is randomly initialised from train.seed."""
    vocab_size: int = 512
    """Base vocabulary size V (the two new tokens get ids V and V+1)."""
    hidden_size: int = 64
    """Model width D."""
    intermediate_size: int = 128
    """SwiGLU MLP width."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention (query) heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; unset means multi-head (= num_heads)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output head."""
    max_position_embeddings: int = 2048
    """Longest sequence the RoPE tables are built for."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class VisionConfig:
    """The frozen open_clip vision encoder."""

    model_name: str = "flamingo-debug-vit"
    """open_clip model name (e.g. ViT-L-14, ViT-H-14); `flamingo-debug-vit` is our tiny test ViT;
    `idefics` (set by model.init_from) builds the ViT shape of an IDEFICS checkpoint."""
    pretrained: Optional[str] = None
    """Local open_clip weights file; unset means random initialisation (tests only). Nothing is
    ever downloaded."""
    activation: str = "gelu"
    """ViT MLP activation: `quick_gelu` for OpenAI CLIP weights, `gelu` for LAION weights. open_clip
    cannot tell from a local file, so it is stated here."""


@dataclass
class ResamplerConfig:
    """The trainable Perceiver Resampler (IDEFICS layout)."""

    num_latents: int = 64
    """Learned latent queries per image (the number of visual tokens the LM sees per image)."""
    depth: int = 6
    """Number of resampler blocks."""
    num_heads: int = 16
    """Attention heads in each block."""
    head_dim: int = 96
    """Width of each head."""
    qk_layer_norms: bool = False
    """LayerNorm on queries and keys per head."""
    max_frames: int = 0
    """Video: learned per-frame time embeddings for up to this many frames (Flamingo's video
    input: the frames of one video are encoded separately, get their time embedding and are
    resampled together into one set of latents). 0 = images only; a model with time embeddings
    cannot be exported to IDEFICS."""


@dataclass
class XAttnConfig:
    """The trainable tanh-gated cross-attention dense blocks."""

    cross_layer_interval: int = 4
    """One block every this many LM layers."""
    placement: str = "idefics"
    """`idefics`: before layer i when i % interval == 0 (exportable); `openflamingo`: before layer i
    when (i+1) % interval == 0; `explicit`: before each layer in `layers`."""
    layers: list[int] = field(default_factory=list)
    """Layer indices for `placement: explicit`."""
    alpha_type: str = "float"
    """Gate shape: `float` (one scalar per gate) or `vector` (one per channel)."""
    alpha_init: float = 0.0
    """Initial alpha of every gate (tanh(alpha) scales the block's output). 0, the paper's choice,
    makes the initial model exactly the frozen LM."""
    qk_layer_norms: bool = False
    """RMSNorm on queries and keys per head."""


@dataclass
class ModelConfig:
    """The whole Flamingo model."""

    lm: LMConfig = field(default_factory=LMConfig)
    """Frozen language model."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Frozen vision encoder."""
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    """Perceiver Resampler."""
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    """Gated cross-attention blocks."""
    packed_attention: str = "mask"
    """How the LM's self-attention keeps the documents packed into one sequence apart: `mask`, a
    [B, 1, T, T] boolean mask through scaled_dot_product_attention (any device); `flex`,
    FlexAttention with a block mask built from the document ids, compiled into one kernel that
    skips the blocks no token attends to (the same result; training with it needs a CUDA device,
    as torch has no FlexAttention backward on CPU)."""
    init_from: Optional[str] = None
    """A transformers IDEFICS checkpoint directory (IdeficsForVisionText2Text) to start from:
    every weight, every shape above and the tokenizer come from it (shape fields given here are
    reported and replaced). Excludes model.lm.path and model.vision.pretrained."""
    synthetic_backbones: Optional[str] = None
    """Directory of the tiny LM and ViT pretrained on the synthetic corpus for this LM shape and
    vision tower (flamingo_dist/demo/backbones.py), built there by the first run that needs them
    (about a minute on 2 CPU cores; `tools/build_backbones.py` builds them ahead): model.lm.path
    and model.vision.pretrained then point into it. The debug flavor sets `data/backbones`; null
    means a random LM and ViT. Excludes model.lm.path, model.vision.pretrained and init_from."""


@dataclass
class ParallelConfig:
    """How the world is split: world size = tensor_parallel_size x data-parallel size."""

    tensor_parallel_size: int = 1
    """Megatron tensor-parallel degree for the LM and the cross-attention blocks."""


@dataclass
class TrainConfig:
    """Optimisation and the training loop."""

    steps: int = 20
    """Optimizer steps to run."""
    micro_batch_size: int = 2
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of `lr`."""
    warmup_steps: int = 2
    """Linear warm-up steps from 0 to `lr`."""
    schedule: str = "cosine"
    """After warm-up: `cosine` decay to min_lr_ratio * lr over the remaining steps, or `constant`."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; not applied to norms, gates, biases, latents and embeddings."""
    lr_scales: dict = field(default_factory=dict)
    """Multipliers of the learning rate per kind of trainable parameter: `gates` (the alphas of
    the tanh gates), `resampler`, `xattn` (the cross-attention blocks' other weights),
    `embeddings` (the new tokens' decoupled embedding and head); a kind not named gets 1."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (mean squared log-partition); 0 disables it."""
    loss_chunk_tokens: int = 0
    """> 0: the LM head and the loss run on chunks of this many positions per sequence, each
    recomputed in backward, so the full [batch, seq, vocab] logits are never held (memory for
    large vocabularies; costs one more head forward). 0: the whole batch at once."""
    precision: str = "bf16"
    """`bf16`: bf16 weights and activations everywhere, fp32 master weights for trainable
    parameters; `fp32`: everything in fp32 (parity tests)."""
    activation_checkpointing: bool = False
    """Recompute each LM layer (and its cross-attention block) in the backward pass."""
    compile: bool = False
    """torch.compile each (cross-attention block, LM layer) unit for training and validation
    (generation stays eager). The first steps pay the compilation (tens of seconds per distinct
    unit on CPU); see docs/benchmarks.md for what it gains. fp32 losses equal eager's; in bf16
    they differ in the third digit (inductor keeps fused intermediates in fp32 where eager rounds
    every op to bf16)."""
    fused_zero_step: bool = True
    """Our ZeRO optimizer step (training/zero_step.py): one gradient norm over the whole
    partition, the skip decided from the step's one read of the device, one fused AdamW call; the
    same update as DeepSpeed's step (tests/test_zero_step.py) in tens of operators instead of
    thousands. Written against DeepSpeed 0.19.8, refused with any other; `false`: DeepSpeed's own
    step (a per-tensor overflow check and norm, host reads of its own). Offload, MoE and loss
    scaling always use DeepSpeed's."""
    zero3_partition_frozen: bool = False
    """ZeRO-3 only: give DeepSpeed the whole model, so the frozen ViT and LM are partitioned across
    data parallelism too and gathered in every forward and backward (3b on one H200: 4x the step
    time of leaving them replicated, issue 19). Only for a frozen LM too large for the GPUs of one
    tensor-parallel group. By default DeepSpeed gets the trainable modules alone, and the frozen
    weights stay TP-sharded and replicated across data parallelism in bf16."""
    cpu_keep_freed_memory: bool = True
    """Training on CPU: glibc keeps freed memory for reuse instead of unmapping every large block
    (a step reallocates the same gradient buffers: 55-79 thousand pages faulted in per step of
    tools/bench_openflamingo.py's shape, 6 when kept in a median step; docs/benchmarks.md).
    Resident memory then stays near its peak. No effect on GPU."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    max_consecutive_skipped_steps: int = 5
    """Stop the run when this many optimizer steps in a row had a non-finite loss or gradient."""
    log_every: int = 1
    """Log metrics every this many steps. A logged step also reads the gate values and the data
    counters back from the device; the others read it once (the step's decisions and loss)."""
    hang_timeout_s: float = 1800.0
    """The hang watchdog (training/watchdog.py): an optimizer step (with its logging) that has not
    finished after this many seconds is a hang: every rank writes its stacks and last collective
    to <run_dir>/hang/, the job is requeued under SLURM, and the process exits with status 5
    (tools/hang_report.py reads what was written). 0 turns the watchdog off."""
    hang_timeout_first_step_s: float = 3600.0
    """The same for the first step after a start or resume (compilation, data warm-up)."""
    hang_timeout_save_s: float = 3600.0
    """The same for a checkpoint save, a validation and an evaluation."""
    spike_rollback: bool = False
    """Roll back loss spikes (docs/operations.md): when the loss exceeds spike_factor times the
    median of the last spike_window step losses for spike_steps steps in a row (or is not finite
    for max_consecutive_skipped_steps steps), every rank reloads the newest committed checkpoint
    older than the spike, skips the data read since, and goes on. Needs checkpoints
    (checkpoint.every_steps or every_minutes) and keep_last >= 2."""
    spike_factor: float = 3.0
    """A step's loss above this times the running median is a spike."""
    spike_window: int = 100
    """Steps whose losses make the running median (judging starts once spike_min_history are in)."""
    spike_min_history: int = 10
    """Steps of loss history before any step is judged a spike."""
    spike_steps: int = 2
    """Consecutive spiking steps that trigger a rollback."""
    max_rollbacks: int = 3
    """Rollbacks allowed within rollback_window_steps steps; one more stops the run with one line."""
    rollback_window_steps: int = 1000
    """The window of max_rollbacks, in steps run (rolled-back steps count)."""
    stop_grace_s: float = 600.0
    """After a stop signal (SIGTERM, SIGINT, SIGUSR1/2) or the death of the launcher, the ranks
    save a committed checkpoint at the end of the step and exit; a rank still alive this many
    seconds after the request (its peers dead, a collective that never returns) exits anyway
    (docs/operations.md). 0: no limit."""


@dataclass
class SourceConfig:
    """One training data source, an entry of `data.sources` (see flamingo_dist/data/formats.py
    for the shard formats)."""

    name: str = ""
    """Name in logs and metrics (loss/<name>, data/<name>/...); unique."""
    format: str = "obelics"
    """Shard format: obelics (interleaved texts/images lists), mmc4 (MMC4 documents),
    pairs (img2dataset image + caption), video (frames + caption)."""
    shards: str = ""
    """Webdataset shard pattern (brace notation), glob, or directory of .tar files."""
    synthetic: str = ""
    """Instead of shards, a generated synthetic corpus (flamingo_dist/data/synthetic.py):
    `attributes` (the debug corpus of data.synthetic_dir) or `binding` (fast-binding episodes:
    labels bound to shapes per document), written to data.synthetic_dir/<name> (and its val/
    when validation is on) when missing, data.synthetic_num_docs documents of up to
    data.max_images images."""
    val_shards: Optional[str] = None
    """Held-out shards of this source, evaluated every data.val_every_steps steps."""
    weight: float = 1.0
    """Loss weight lambda: the step's objective is sum over sources of weight x the source's mean
    token loss (the paper: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03)."""
    micro_batch_size: int = 0
    """Sequences per micro-batch of this source; 0 = train.micro_batch_size."""
    min_sim: float = 0.24
    """mmc4: images whose matched_sim is below this are dropped."""
    image_after_text_p: float = 0.5
    """mmc4: probability that an image goes after the sentence it matched instead of before it."""


@dataclass
class DataConfig:
    """The training data: sources of webdataset shards, mixed in every step (or the synthetic
    debug corpus), and how documents become sequences."""

    sources: list = field(default_factory=list)
    """Data sources, each a mapping with the fields of `data.sources[]` below. Every optimizer
    step takes train.grad_accum_steps micro-batches of every source. Empty: one obelics source
    named `main` from data.shards (or the synthetic corpus)."""
    shards: Optional[str] = None
    """Shorthand for one obelics source: webdataset shard pattern (brace notation) or directory of
    .tar files; unset (and no sources) means the synthetic corpus in `synthetic_dir`."""
    val_shards: Optional[str] = None
    """Held-out shards for the shorthand source (or the synthetic corpus)."""
    synthetic_dir: str = "data/synthetic"
    """Where the synthetic corpus lives (relative paths are from the working directory)."""
    synthetic_num_docs: int = 256
    """Documents in the generated synthetic corpus (each with 1 to data.max_images images)."""
    synthetic_val_docs: int = 64
    """Documents in the synthetic corpus' held-out part (generated when validation is on)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to lm.path (or init_from's), and on the synthetic corpus to
    its bundled tokenizer. Required with data shards and a random LM (checked at start-up)."""
    seq_len: int = 256
    """Tokens per training sequence (the paper's 256; the debug flavor uses 64)."""
    max_images: int = 5
    """Media (images or videos) per sequence (the paper's 5; debug: 3); further media of a
    document are dropped with the text before the next one."""
    image_size: int = 224
    """Square side the images are resized to; must match the vision encoder (debug: 32)."""
    frames_per_video: int = 8
    """Frames taken, evenly spread, from each video (video sources)."""
    pack: bool = True
    """Pack several short documents into one sequence (until its tokens or media run out)."""
    per_document_attention: bool = True
    """Packed documents attend only to themselves and their positions restart at 0; false trains
    exactly as IDEFICS' processor packs (one causal stream; images still reset at every EOS)."""
    streams: int = 0
    """Streams each source's shards are split into (see flamingo_dist/data/pipeline.py); must be a
    multiple of data-parallel size x max(1, num_workers), also after a resume at another layout.
    0 = that product at the first start (a resume keeps the checkpoint's number)."""
    num_workers: int = 0
    """DataLoader worker processes per rank and source."""
    max_image_bytes: int = 33554432
    """Encoded images larger than this are skipped (reason image_too_large)."""
    max_image_pixels: int = 67108864
    """Images with more pixels than this are skipped before decoding (image_too_large)."""
    jpeg_draft: bool = True
    """Decode JPEGs at a reduced scale (libjpeg's draft mode) when that still gives at least
    image_size pixels per side: much faster for web images."""
    max_skip_rate: float = 0.2
    """Stop the run (naming the shard) when more than this fraction of a shard's samples were
    bad, counted once the shard gave skip_rate_min_samples samples."""
    skip_rate_min_samples: int = 100
    """Samples of a shard read before its skip rate is judged."""
    val_every_steps: int = 0
    """Validation loss per source on its val_shards every this many steps; 0 disables."""
    val_batches: int = 4
    """Micro-batches per source and data-parallel rank in each validation (the same ones every time)."""


@dataclass
class TrackingConfig:
    """Run directory and MLflow tracking."""

    run_dir: str = "runs/debug"
    """Directory for logs, the local MLflow store and (later) checkpoints."""
    mlflow: bool = True
    """Log to MLflow (rank 0 only)."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; unset means $MLFLOW_TRACKING_URI, else a sqlite store in run_dir."""
    experiment: str = "flamingo_dist"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name; defaults to the flavor name."""
    required: bool = False
    """Stop at start when MLflow does not answer within start_timeout_s. Off: one warning, and
    training goes on (metrics.jsonl has every record; MLflow gets them when it answers)."""
    start_timeout_s: float = 10.0
    """How long the start waits for MLflow to open the run (it keeps trying in the background)."""
    close_timeout_s: float = 30.0
    """How long the end of a run waits for MLflow to take the records still queued."""
    request_timeout_s: float = 10.0
    """Timeout of one HTTP request to an MLflow server (MLFLOW_HTTP_REQUEST_TIMEOUT unless set);
    failed requests are retried by the background sender, with backoff up to 10 s."""
    queue_size: int = 100000
    """Records waiting for MLflow at most (one per logged step); beyond, MLflow misses the later
    ones (metrics.jsonl still has them) and a warning says so."""


@dataclass
class CheckpointConfig:
    """Committed checkpoints and resume (see flamingo_dist/training/checkpoint.py)."""

    dir: Optional[str] = None
    """Where checkpoints go; unset means <tracking.run_dir>/checkpoints."""
    every_steps: int = 0
    """Save every this many optimizer steps; 0 disables."""
    every_minutes: float = 0.0
    """Save when this many minutes passed since the last save (decided on rank 0); 0 disables."""
    at_end: bool = True
    """Save when training finishes."""
    keep_last: int = 3
    """Keep the newest this many committed checkpoints; older ones are deleted in the background.
    0 keeps all."""
    keep_every: int = 0
    """Also keep forever every checkpoint whose step is a multiple of this; 0 disables."""
    resume: Optional[str] = None
    """`auto`: continue from the newest committed checkpoint in `dir` (start fresh if none);
    a checkpoint path: continue from that one (it must verify)."""


@dataclass
class EvalConfig:
    """Few-shot evaluation during training (flamingo_dist/eval/fewshot.py), logged to MLflow as
    eval/<task>/<shots>shot_<method> and written to <run_dir>/eval/step_<N>.json."""

    every_steps: int = 0
    """Evaluate every this many optimizer steps; 0 disables."""
    at_start: bool = False
    """Also validate (data.val_every_steps) and evaluate (eval.every_steps) before the first step
    of a fresh run: the baseline of the curves."""
    synthetic: bool = False
    """Evaluate on the project's synthetic suite (captioning, VQA, HatefulMemes of shapes),
    written to <run_dir>/eval_tasks when missing; for debug models."""
    tasks_file: Optional[str] = None
    """YAML/JSON list of task specs (see flamingo_dist/eval/tasks.py `load_task`)."""
    shots: list[int] = field(default_factory=lambda: [0, 4])
    """Shot counts (0 = two text-only demonstrations)."""
    methods: list[str] = field(default_factory=lambda: ["random"])
    """Demonstration selection: `random` and/or `rices`."""
    trials: int = 1
    """Seeds per configuration (mean and standard deviation are reported)."""
    max_queries: int = 16
    """Evaluate the first this many queries of each task (a small fixed subset)."""
    max_new_tokens: int = 10
    """Generation length for captions and answers."""
    num_beams: int = 3
    """Beam search width for captions and answers (OpenFlamingo's 3); 1 is greedy decoding."""
    synthetic_tasks: list[str] = field(default_factory=list)
    """The tasks of the synthetic suite to run (synthetic_captions, synthetic_vqa_color,
    synthetic_vqa_shape, synthetic_memes, synthetic_shapes, and the fast-binding pair
    synthetic_binding, synthetic_binding_shuffled: 240 queries each, run only when named); empty
    means all but the binding pair."""
    attribute_words: dict = field(default_factory=dict)
    """Word groups (name -> words, each one token) whose next-token top-1 accuracy on the
    validation batches is measured at every validation with the true images, with images
    shuffled across documents and with no images (val/accuracy/<true|shuffled|no>_images/<group>;
    flamingo_dist/eval/attributes.py). Empty: the synthetic corpus' colour, shape and size words
    when training on it, else none."""


@dataclass
class SlurmConfig:
    """Stop and requeue under SLURM (see flamingo_dist/distributed/slurm.py and launchers/)."""

    signal_lead_s: int = 120
    """Seconds before the time limit that SLURM sends the stop signal (the launchers set it); a
    signal with less than this plus 60 s left counts as a time-out, any other as a preemption."""
    max_timeout_requeues: int = 3
    """Requeues allowed after time-outs (preemptions requeue without limit)."""


@dataclass
class JobConfig:
    """Everything one training run needs."""

    flavor: str = "debug"
    """Named model shape this config started from (see flamingo_dist/config/flavors.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Tracking and outputs."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Preemption-safe stop and requeue under SLURM."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Few-shot evaluation during training."""


CHECKPOINT_COMMIT = "COMMITTED.json"  # the marker file of a committed checkpoint (training/checkpoint.py)


def step_folders(root: str) -> list[str]:
    """Checkpoint step directories (step_NNNNNNNN) under root, committed or not, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))


def committed_checkpoints(root: str) -> list[str]:
    """Committed checkpoint directories (step_NNNNNNNN with the commit marker) under root, oldest
    first. Here, without torch, so the start-up checks can use it."""
    return [d for d in step_folders(root) if os.path.isfile(os.path.join(d, CHECKPOINT_COMMIT))]


def checkpoint_dir(cfg: JobConfig) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.tracking.run_dir, "checkpoints")


def xattn_layer_indices(cfg: ModelConfig) -> list[int]:
    """LM layer indices that get a cross-attention block placed *before* them."""
    x, n = cfg.xattn, cfg.lm.num_layers
    if x.placement == "idefics":
        return [i for i in range(n) if i % x.cross_layer_interval == 0]
    if x.placement == "openflamingo":
        return [i for i in range(n) if (i + 1) % x.cross_layer_interval == 0]
    return sorted(set(x.layers))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
