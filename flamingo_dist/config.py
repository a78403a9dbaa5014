"""Typed configuration: nested dataclasses, one docstring under every field.

YAML files and ``--set a.b=value`` overrides only select values; derived values (vocabulary
padding, head dim, placement of cross-attention blocks) are computed, never typed twice.
``validate`` reports every error at once, before any heavy import or allocation.
The docstrings are the documentation: ``tools/gen_config_docs.py`` renders them into
``docs/config.md`` and a test keeps that file current.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


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
    init_from: Optional[str] = None
    """A transformers IDEFICS checkpoint directory (IdeficsForVisionText2Text) to start from:
    every weight, every shape above and the tokenizer come from it (shape fields given here are
    reported and replaced). Excludes model.lm.path and model.vision.pretrained."""


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
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (mean squared log-partition); 0 disables it."""
    precision: str = "bf16"
    """`bf16`: bf16 weights and activations everywhere, fp32 master weights for trainable
    parameters; `fp32`: everything in fp32 (parity tests)."""
    activation_checkpointing: bool = False
    """Recompute each LM layer (and its cross-attention block) in the backward pass."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    max_consecutive_skipped_steps: int = 5
    """Stop the run when this many optimizer steps in a row had a non-finite loss or gradient."""
    log_every: int = 1
    """Log metrics every this many steps."""


@dataclass
class DataConfig:
    """The training data (the debug synthetic interleaved corpus for now)."""

    shards: Optional[str] = None
    """Webdataset shard pattern (brace notation) or directory of .tar files; unset means the
    synthetic corpus in `synthetic_dir`, generated when missing."""
    synthetic_dir: str = "data/synthetic"
    """Where the synthetic corpus lives (relative paths are from the working directory)."""
    synthetic_num_docs: int = 256
    """Documents in the generated synthetic corpus."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to lm.path, or for a random LM to the synthetic corpus's
    bundled tokenizer."""
    seq_len: int = 64
    """Tokens per training sequence."""
    max_images: int = 3
    """Images per sequence (extra images and their text are dropped)."""
    image_size: int = 32
    """Square side the images are resized to; must match the vision encoder."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


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


@dataclass
class CheckpointConfig:
    """Committed checkpoints and resume (see flamingo_dist/checkpoint.py)."""

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


@dataclass
class SlurmConfig:
    """Stop and requeue under SLURM (see flamingo_dist/slurm.py and launchers/)."""

    signal_lead_s: int = 120
    """Seconds before the time limit that SLURM sends the stop signal (the launchers set it); a
    signal with less than this plus 60 s left counts as a time-out, any other as a preemption."""
    max_timeout_requeues: int = 3
    """Requeues allowed after time-outs (preemptions requeue without limit)."""


@dataclass
class JobConfig:
    """Everything one training run needs."""

    flavor: str = "debug"
    """Named model shape this config started from (see flamingo_dist/flavors.py)."""
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


# --------------------------------------------------------------------------------------------
# Selecting values: flavor -> YAML -> --set overrides.


def _merge(obj: Any, values: dict, prefix: str, errors: list[str]) -> None:
    """Set dataclass fields of `obj` from a nested dict, collecting unknown keys as errors."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            errors.append(f"{path}: unknown field (known: {', '.join(sorted(names))})")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                errors.append(f"{path}: expected a mapping, got {value!r}")
            else:
                _merge(current, value, path + ".", errors)
        else:
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(current, float) and isinstance(value, str):
                try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                    value = float(value)
                except ValueError:
                    pass
            setattr(obj, key, value)


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def config_from_dict(values: dict) -> JobConfig:
    """A JobConfig from a dict of the same shape (a checkpoint's resolved config), validated."""
    from flamingo_dist.flavors import get_flavor

    cfg = get_flavor(values.get("flavor", "debug"))
    errors: list[str] = []
    _merge(cfg, values, "", errors)
    validate(cfg, errors)
    return cfg


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> JobConfig:
    """Build a JobConfig: the flavor named in the YAML (or `debug`), then the YAML's values,
    then each `dotted.key=value` override; validated before returning."""
    from flamingo_dist.flavors import get_flavor

    values: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: expected a YAML mapping at the top level")
    parsed = [_parse_override(o) for o in overrides]
    flavor = values.get("flavor", "debug")
    for p in parsed:
        flavor = p.get("flavor", flavor)
    cfg = get_flavor(flavor)
    errors: list[str] = []
    _merge(cfg, values, "", errors)
    for p in parsed:
        _merge(cfg, p, "", errors)
    validate(cfg, errors)
    return cfg


def _check_types(obj: Any, prefix: str, errors: list[str]) -> None:
    """Catch values of the wrong type (a YAML string where a number belongs, say)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_types(value, path + ".", errors)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            errors.append(f"{path}: expected {type(default).__name__}, got {value!r}")


def validate(cfg: JobConfig, errors: Optional[list[str]] = None, world_size: Optional[int] = None) -> None:
    """Check every field and their relations; raise one ConfigError listing all problems."""
    errors = list(errors or [])
    _check_types(cfg, "", errors)
    if errors:  # the relational checks below assume the types are right
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    lm, t, x, r = cfg.model.lm, cfg.train, cfg.model.xattn, cfg.model.resampler
    tp = cfg.parallel.tensor_parallel_size

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        need(getattr(lm, name) > 0, f"model.lm.{name}: must be positive")
    if lm.num_heads > 0:
        need(lm.hidden_size % lm.num_heads == 0,
             f"model.lm.hidden_size ({lm.hidden_size}) must be divisible by model.lm.num_heads ({lm.num_heads})")
        need(lm.num_kv_heads is None or (lm.num_kv_heads > 0 and lm.num_heads % lm.num_kv_heads == 0),
             f"model.lm.num_kv_heads ({lm.num_kv_heads}) must divide model.lm.num_heads ({lm.num_heads})")
    need(lm.rope_theta > 0, "model.lm.rope_theta: must be positive")
    if lm.path is not None and not os.path.isdir(lm.path):
        errors.append(f"model.lm.path: {lm.path} is not a directory")
    init = cfg.model.init_from
    if init is not None:
        if not os.path.isdir(init):
            errors.append(f"model.init_from: {init} is not a directory")
        if lm.path is not None or cfg.model.vision.pretrained is not None:
            errors.append("model.init_from: excludes model.lm.path and model.vision.pretrained (it holds all weights)")
    need(tp >= 1, "parallel.tensor_parallel_size: must be >= 1")
    if tp >= 1 and lm.num_heads > 0:
        need(lm.num_heads % tp == 0,
             f"parallel.tensor_parallel_size ({tp}) must divide model.lm.num_heads ({lm.num_heads})")
        need(lm.kv_heads % tp == 0,
             f"parallel.tensor_parallel_size ({tp}) must divide the key/value heads ({lm.kv_heads}, "
             "model.lm.num_kv_heads)")
        need(lm.intermediate_size % tp == 0,
             f"parallel.tensor_parallel_size ({tp}) must divide model.lm.intermediate_size ({lm.intermediate_size})")
    if world_size is not None and tp >= 1:
        need(world_size % tp == 0,
             f"parallel.tensor_parallel_size ({tp}) must divide the world size ({world_size})")
    need(x.placement in ("idefics", "openflamingo", "explicit"),
         f"model.xattn.placement: {x.placement!r} is not one of idefics, openflamingo, explicit")
    need(x.cross_layer_interval >= 1, "model.xattn.cross_layer_interval: must be >= 1")
    if x.placement == "explicit":
        need(bool(x.layers), "model.xattn.layers: placement explicit needs a non-empty list")
        bad = [i for i in x.layers if not (isinstance(i, int) and 0 <= i < lm.num_layers)]
        need(not bad, f"model.xattn.layers: {bad} outside 0..{lm.num_layers - 1}")
    elif x.layers:
        errors.append("model.xattn.layers: only used with placement explicit")
    need(x.alpha_type in ("float", "vector"), f"model.xattn.alpha_type: {x.alpha_type!r} is not float or vector")
    for name in ("num_latents", "depth", "num_heads", "head_dim"):
        need(getattr(r, name) > 0, f"model.resampler.{name}: must be positive")
    need(cfg.model.vision.activation in ("gelu", "quick_gelu"),
         f"model.vision.activation: {cfg.model.vision.activation!r} is not gelu or quick_gelu")
    vp = cfg.model.vision.pretrained
    if vp is not None and not os.path.isfile(vp):
        errors.append(f"model.vision.pretrained: {vp} is not a file")
    need(t.steps >= 1, "train.steps: must be >= 1")
    need(t.micro_batch_size >= 1, "train.micro_batch_size: must be >= 1")
    need(t.grad_accum_steps >= 1, "train.grad_accum_steps: must be >= 1")
    need(t.lr > 0, "train.lr: must be positive")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio: must be in [0, 1]")
    need(t.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    need(t.schedule in ("cosine", "constant"), f"train.schedule: {t.schedule!r} is not cosine or constant")
    need(t.weight_decay >= 0, "train.weight_decay: must be >= 0")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas: two values in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip: must be >= 0")
    need(t.z_loss >= 0, "train.z_loss: must be >= 0")
    need(t.precision in ("bf16", "fp32"), f"train.precision: {t.precision!r} is not bf16 or fp32")
    need(t.max_consecutive_skipped_steps >= 1, "train.max_consecutive_skipped_steps: must be >= 1")
    need(t.log_every >= 1, "train.log_every: must be >= 1")
    ck = cfg.checkpoint
    need(ck.every_steps >= 0, "checkpoint.every_steps: must be >= 0")
    need(ck.every_minutes >= 0, "checkpoint.every_minutes: must be >= 0")
    need(ck.keep_last >= 0, "checkpoint.keep_last: must be >= 0")
    need(ck.keep_every >= 0, "checkpoint.keep_every: must be >= 0")
    if ck.resume not in (None, "auto") and not os.path.isdir(ck.resume):
        errors.append(f"checkpoint.resume: {ck.resume} is neither 'auto' nor a checkpoint directory")
    d = cfg.data
    need(d.seq_len >= 8, "data.seq_len: must be >= 8")
    need(d.seq_len <= lm.max_position_embeddings,
         f"data.seq_len ({d.seq_len}) exceeds model.lm.max_position_embeddings ({lm.max_position_embeddings})")
    need(d.max_images >= 1, "data.max_images: must be >= 1")
    need(d.num_workers >= 0, "data.num_workers: must be >= 0")
    need(d.synthetic_num_docs >= 1, "data.synthetic_num_docs: must be >= 1")
    if d.tokenizer is not None and not os.path.isdir(d.tokenizer):
        errors.append(f"data.tokenizer: {d.tokenizer} is not a directory")
    ev = cfg.eval
    need(ev.every_steps >= 0, "eval.every_steps: must be >= 0")
    need(all(k >= 0 for k in ev.shots) and len(ev.shots) > 0, "eval.shots: a non-empty list of counts >= 0")
    need(len(ev.methods) > 0 and set(ev.methods) <= {"random", "rices"}, "eval.methods: random and/or rices")
    need(ev.trials >= 1 and ev.max_queries >= 1 and ev.max_new_tokens >= 1 and ev.num_beams >= 1,
         "eval.trials, eval.max_queries, eval.max_new_tokens, eval.num_beams: must be >= 1")
    if ev.tasks_file is not None and not os.path.isfile(ev.tasks_file):
        errors.append(f"eval.tasks_file: {ev.tasks_file} is not a file")
    need(ev.every_steps == 0 or ev.synthetic or ev.tasks_file is not None,
         "eval.every_steps: set eval.synthetic or eval.tasks_file (nothing to evaluate)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


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
