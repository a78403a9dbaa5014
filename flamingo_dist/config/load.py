"""Selecting config values and checking them: the flavor, then the YAML file, then each
``--set dotted.key=value`` override; ``validate`` reports every problem at once, before any heavy
import or allocation. (The typed fields themselves are in schema.py.)"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import yaml

from flamingo_dist.config.schema import (
    DATA_FORMATS,
    LR_GROUPS,
    SYNTHETIC_KINDS,
    SYNTHETIC_TASKS,
    ConfigError,
    JobConfig,
    SourceConfig,
)


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


def _yaml_problem(e: "yaml.YAMLError") -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's message spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def config_from_dict(values: dict) -> JobConfig:
    """A JobConfig from a dict of the same shape (a checkpoint's resolved config), validated."""
    from flamingo_dist.config.flavors import get_flavor

    cfg = get_flavor(values.get("flavor", "debug"))
    # A saved config names the weights it used; one from before model.synthetic_backbones existed
    # must not pick up the flavor's backbones in place of its own (random) LM.
    cfg.model.synthetic_backbones = None
    errors: list[str] = []
    _merge(cfg, values, "", errors)
    validate(cfg, errors)
    return cfg


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> JobConfig:
    """Build a JobConfig: the flavor named in the YAML (or `debug`), then the YAML's values,
    then each `dotted.key=value` override; validated before returning."""
    from flamingo_dist.config.flavors import get_flavor

    values: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({_yaml_problem(e)})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: cannot be read ({e})") from None
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


def source_configs(cfg: JobConfig, errors: Optional[list[str]] = None) -> list[SourceConfig]:
    """data.sources as SourceConfig objects (defaults filled in); with no sources, the one obelics
    source `main` of data.shards. Problems go to `errors` (or raise ConfigError)."""
    d, own = cfg.data, errors is None
    errors = [] if own else errors
    out: list[SourceConfig] = []
    entries = d.sources or [{"name": "main", "format": "obelics", "shards": d.shards or "", "val_shards": d.val_shards}]
    if d.sources and (d.shards is not None or d.val_shards is not None):
        errors.append("data.shards / data.val_shards: only without data.sources (give each source its shards)")
    for i, entry in enumerate(entries):
        where = f"data.sources[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: expected a mapping, got {entry!r}")
            continue
        src = SourceConfig()
        _merge(src, entry, where + ".", errors)
        _check_types(src, where + ".", errors)
        if src.micro_batch_size == 0:
            src.micro_batch_size = cfg.train.micro_batch_size
        if not src.name:
            errors.append(f"{where}.name: required")
        if src.format not in DATA_FORMATS:
            errors.append(f"{where}.format: {src.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if d.sources and not src.shards and not src.synthetic:
            errors.append(f"{where}.shards: required (or .synthetic)")
        if src.synthetic and src.synthetic not in SYNTHETIC_KINDS:
            errors.append(f"{where}.synthetic: {src.synthetic!r} is not one of {', '.join(SYNTHETIC_KINDS)}")
        if src.synthetic and (src.shards or src.val_shards or src.format != "obelics"):
            errors.append(f"{where}: a synthetic source takes no shards, val_shards or format")
        if not (isinstance(src.weight, (int, float)) and src.weight > 0):
            errors.append(f"{where}.weight: must be positive")
        if isinstance(src.micro_batch_size, int) and src.micro_batch_size < 1:
            errors.append(f"{where}.micro_batch_size: must be >= 1 (or 0 for train.micro_batch_size)")
        if not (isinstance(src.image_after_text_p, (int, float)) and 0 <= src.image_after_text_p <= 1):
            errors.append(f"{where}.image_after_text_p: must be in [0, 1]")
        if src.format == "video" and cfg.model.resampler.max_frames < d.frames_per_video:
            errors.append(f"{where}: a video source needs model.resampler.max_frames >= data.frames_per_video "
                          f"({cfg.model.resampler.max_frames} < {d.frames_per_video})")
        out.append(src)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        errors.append(f"data.sources: names must be unique ({names})")
    if own and errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return out


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
    given = [name for name, value in (("model.lm.path", lm.path), ("model.vision.pretrained", cfg.model.vision.pretrained),
                                      ("model.init_from", init)) if value is not None]
    if cfg.model.synthetic_backbones is not None and given:
        errors.append(f"model.synthetic_backbones ({cfg.model.synthetic_backbones}, the debug flavor's default) excludes "
                      f"{', '.join(given)}: set model.synthetic_backbones=null to use your own weights")
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
    need(cfg.model.packed_attention in ("mask", "flex"),
         f"model.packed_attention: {cfg.model.packed_attention!r} is not mask or flex")
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
    bad_scales = {k: v for k, v in t.lr_scales.items()
                  if k not in LR_GROUPS or not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0}
    need(not bad_scales, f"train.lr_scales: {bad_scales} (keys: {', '.join(LR_GROUPS)}; values > 0)")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas: two values in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip: must be >= 0")
    need(t.z_loss >= 0, "train.z_loss: must be >= 0")
    need(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens: must be >= 0 (0: no chunking)")
    need(t.precision in ("bf16", "fp32"), f"train.precision: {t.precision!r} is not bf16 or fp32")
    need(t.max_consecutive_skipped_steps >= 1, "train.max_consecutive_skipped_steps: must be >= 1")
    need(t.log_every >= 1, "train.log_every: must be >= 1")
    ck = cfg.checkpoint
    need(ck.every_steps >= 0, "checkpoint.every_steps: must be >= 0")
    need(ck.every_minutes >= 0, "checkpoint.every_minutes: must be >= 0")
    need(ck.keep_last >= 0, "checkpoint.keep_last: must be >= 0")
    need(ck.keep_every >= 0, "checkpoint.keep_every: must be >= 0")
    for name in ("hang_timeout_s", "hang_timeout_first_step_s", "hang_timeout_save_s", "stop_grace_s"):
        need(getattr(t, name) >= 0, f"train.{name}: must be >= 0 (0: off)")
    if t.spike_rollback:
        need(bool(ck.every_steps or ck.every_minutes), "train.spike_rollback: needs checkpoints to roll back to "
             "(checkpoint.every_steps or checkpoint.every_minutes)")
        need(ck.keep_last == 0 or ck.keep_last >= 2, "train.spike_rollback: needs checkpoint.keep_last >= 2 (or 0: "
             "keep all), so that a checkpoint older than a spike is still there")
        need(t.spike_factor > 1, "train.spike_factor: must be > 1")
        need(t.spike_window >= t.spike_min_history >= 1, "train.spike_window >= train.spike_min_history >= 1")
        need(t.spike_steps >= 1 and t.max_rollbacks >= 1 and t.rollback_window_steps >= 1,
             "train.spike_steps, train.max_rollbacks, train.rollback_window_steps: must be >= 1")
    if ck.resume not in (None, "auto") and not os.path.isdir(ck.resume):
        errors.append(f"checkpoint.resume: {ck.resume} is neither 'auto' nor a checkpoint directory")
    d = cfg.data
    need(d.seq_len >= 8, "data.seq_len: must be >= 8")
    need(d.seq_len <= lm.max_position_embeddings,
         f"data.seq_len ({d.seq_len}) exceeds model.lm.max_position_embeddings ({lm.max_position_embeddings})")
    need(d.max_images >= 1, "data.max_images: must be >= 1")
    need(d.num_workers >= 0, "data.num_workers: must be >= 0")
    need(d.streams >= 0, "data.streams: must be >= 0")
    if world_size is not None and tp >= 1 and d.streams > 0:
        dp = world_size // tp
        need(d.streams % (dp * max(1, d.num_workers)) == 0,
             f"data.streams ({d.streams}) must be a multiple of data-parallel size x loader workers "
             f"({dp} x {max(1, d.num_workers)})")
    need(d.frames_per_video >= 1, "data.frames_per_video: must be >= 1")
    need(d.max_image_bytes > 0 and d.max_image_pixels > 0, "data.max_image_bytes, data.max_image_pixels: must be > 0")
    need(0 <= d.max_skip_rate <= 1, "data.max_skip_rate: must be in [0, 1]")
    need(d.skip_rate_min_samples >= 1, "data.skip_rate_min_samples: must be >= 1")
    need(d.val_every_steps >= 0, "data.val_every_steps: must be >= 0")
    need(d.val_batches >= 1, "data.val_batches: must be >= 1")
    need(r.max_frames >= 0, "model.resampler.max_frames: must be >= 0")
    sources = source_configs(cfg, errors)
    need(d.val_every_steps == 0 or any(s.val_shards or s.synthetic for s in sources)
         or (not d.sources and d.shards is None),
         "data.val_every_steps: no source has val_shards")
    need(d.synthetic_num_docs >= 1, "data.synthetic_num_docs: must be >= 1")
    need(d.synthetic_val_docs >= 1, "data.synthetic_val_docs: must be >= 1")
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
    unknown = [n for n in ev.synthetic_tasks if n not in SYNTHETIC_TASKS]
    need(not unknown, f"eval.synthetic_tasks: {unknown} not in the synthetic suite ({', '.join(SYNTHETIC_TASKS)})")
    bad_groups = [k for k, v in ev.attribute_words.items()
                  if not (isinstance(v, list) and v and all(isinstance(w, str) for w in v))]
    need(not bad_groups, f"eval.attribute_words: {bad_groups} must each map to a non-empty list of words")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
