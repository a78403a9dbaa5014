"""DeepSpeed JSON: our config decides batch sizes, learning rate, precision and clipping.

The JSON files in ds_configs/ write "auto" for those (the Hugging Face convention) and we fill
them in. A concrete value that disagrees with our config is an error, never a silent override.
An "optimizer" block may state AdamW with "auto" (or equal) parameters: we build torch's AdamW
ourselves (weight-decay groups, nothing to compile on GPU) and hand DeepSpeed that instance.
The learning-rate schedule is ours (train.schedule), so a "scheduler" block is refused.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from flamingo_dist.config.schema import ConfigError, JobConfig

# training/zero_step.py overrides private methods of this DeepSpeed's ZeRO optimizers
DEEPSPEED_VERSION = "0.19.8"


def deepspeed_version_problem(version: str) -> str | None:
    """The one line that refuses a DeepSpeed other than the one the fused ZeRO step was written
    against (train.fused_zero_step)."""
    if version.split("+")[0] == DEEPSPEED_VERSION:
        return None
    return (f"train.fused_zero_step: DeepSpeed {version} is installed, the fused ZeRO step (training/zero_step.py) is "
            f"written against DeepSpeed {DEEPSPEED_VERSION} only: pip install deepspeed=={DEEPSPEED_VERSION}, or set "
            "train.fused_zero_step=false (DeepSpeed's own step, slower)")


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def resolve_ds_config(path_or_dict: str | dict, cfg: JobConfig, dp_size: int) -> dict:
    """Load the JSON, fill "auto" from cfg, and check every concrete value against cfg."""
    if isinstance(path_or_dict, dict):
        ds, where = copy.deepcopy(path_or_dict), "DeepSpeed config"
    else:
        if not os.path.isfile(path_or_dict):
            raise ConfigError(f"--deepspeed {path_or_dict}: no such file")
        try:
            with open(path_or_dict) as f:
                ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed {path_or_dict}: not valid JSON ({e})") from e
        where = path_or_dict
    from flamingo_dist.config.load import source_configs

    t = cfg.train
    gas = t.grad_accum_steps * len(source_configs(cfg))  # one DeepSpeed micro-step per source micro-batch
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * dp_size,
        "gradient_clipping": t.grad_clip,
        "bf16.enabled": t.precision == "bf16",
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": list(t.betas),
        "optimizer.params.eps": t.eps,
        "optimizer.params.weight_decay": t.weight_decay,
    }
    source = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
              "gradient_accumulation_steps": "train.grad_accum_steps x number of data sources",
              "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x sources x data-parallel size",
              "gradient_clipping": "train.grad_clip", "bf16.enabled": "train.precision",
              "optimizer.params.lr": "train.lr", "optimizer.params.betas": "train.betas",
              "optimizer.params.eps": "train.eps", "optimizer.params.weight_decay": "train.weight_decay"}
    errors = []
    opt = ds.get("optimizer")
    if opt is not None and str(opt.get("type", "")).lower() != "adamw":
        errors.append(f"optimizer.type: {opt.get('type')!r}; only AdamW is supported (torch's, built by us)")
    if "scheduler" in ds:
        errors.append("scheduler: remove it; the schedule is set by train.schedule / train.warmup_steps")
    if _get(ds, "bf16.check_grad_overflow") is False:
        errors.append("bf16.check_grad_overflow: must stay true; a non-finite gradient norm must skip the step")
    if _get(ds, "fp16.enabled") in (True, "auto"):
        errors.append("fp16.enabled: fp16 is not supported; use train.precision: bf16 or fp32")
    for key, value in ours.items():
        if key.startswith("optimizer.") and opt is None:
            continue
        given = _get(ds, key)
        if given is None or given == "auto":
            _set(ds, key, value)
        elif (list(given) if isinstance(given, (list, tuple)) else given) != value:
            errors.append(f"{key}: {given!r} in the JSON contradicts {source[key]} = {value!r} "
                          "(write \"auto\" or the same value)")
    if errors:
        raise ConfigError(f"--deepspeed {where}:\n  " + "\n  ".join(errors))
    ds.pop("optimizer", None)  # we pass our own torch AdamW instance
    ds.setdefault("steps_per_print", 10**9)  # our tracker logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds
