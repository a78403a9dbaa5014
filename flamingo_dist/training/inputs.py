"""Start-up checks of everything a run reads from disk, before anything heavy is imported or built:
the DeepSpeed JSON, the checkpoint to resume, the LM's config.json, the tokenizer, every shard
list. Each mistake is one line naming the field or the file (`ConfigError.problems`); the field
checks themselves are config/load.py's `validate`. No torch here (except to look for a CUDA device
when model.packed_attention is flex): `deepspeed flamingo_dist/train.py` with a mistake exits in
about a second."""

from __future__ import annotations

import json
import os

from flamingo_dist.config.load import source_configs
from flamingo_dist.config.schema import CHECKPOINT_COMMIT, ConfigError, JobConfig, committed_checkpoints


def input_problems(cfg: JobConfig, deepspeed: str) -> list[str]:
    """Every problem found with the files the run will read, one line each."""
    problems = []
    if not os.path.isfile(deepspeed):
        problems.append(f"--deepspeed {deepspeed}: no such file")
    else:
        try:
            with open(deepspeed) as f:
                if not isinstance(json.load(f), dict):
                    problems.append(f"--deepspeed {deepspeed}: not a JSON object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"--deepspeed {deepspeed}: not valid JSON ({e})")

    resume = cfg.checkpoint.resume
    if resume not in (None, "auto") and os.path.isdir(resume) \
            and not os.path.isfile(os.path.join(resume, CHECKPOINT_COMMIT)):
        steps = committed_checkpoints(resume)
        hint = (f"; it holds committed checkpoints: give one ({steps[-1]}) or --resume auto "
                f"with checkpoint.dir={resume}") if steps else "; give a step_NNNNNNNN directory of a run's checkpoints"
        problems.append(f"checkpoint.resume: {resume} is not a committed checkpoint (no {CHECKPOINT_COMMIT}){hint}")

    if cfg.train.fused_zero_step:
        from importlib.metadata import PackageNotFoundError, version

        from flamingo_dist.config.deepspeed import deepspeed_version_problem

        try:
            problem = deepspeed_version_problem(version("deepspeed"))
        except PackageNotFoundError:
            problem = "train.fused_zero_step: DeepSpeed is not installed"
        if problem:
            problems.append(problem)

    if cfg.model.packed_attention == "flex":
        import torch

        if not torch.cuda.is_available():
            problems.append("model.packed_attention: flex trains on a CUDA device only (torch has no FlexAttention "
                            "backward on CPU); use mask here")
    lm, d = cfg.model.lm, cfg.data
    if lm.path is not None and os.path.isdir(lm.path):
        from flamingo_dist.hf.llama_config import CheckpointError, read_hf_llama_config

        try:
            read_hf_llama_config(lm.path)
        except CheckpointError as e:
            problems.append(f"model.lm.path: {e}")

    shards_given = bool(d.sources) or d.shards is not None
    random_lm = lm.path is None and cfg.model.init_from is None and cfg.model.synthetic_backbones is None
    if shards_given and random_lm and d.tokenizer is None:
        problems.append("data.tokenizer: required when data shards are given and the LM is random (no model.lm.path "
                        "or model.init_from to take the tokenizer from)")
    if d.tokenizer is not None and os.path.isdir(d.tokenizer) and not any(
            os.path.isfile(os.path.join(d.tokenizer, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                    "tokenizer_config.json")):
        problems.append(f"data.tokenizer: {d.tokenizer} holds no tokenizer (tokenizer.json, tokenizer.model or "
                        "tokenizer_config.json)")

    if shards_given:
        from flamingo_dist.data.formats import list_shards

        for sc in source_configs(cfg):
            where = f"data.sources[{sc.name}]" if d.sources else "data"
            for spec, field in ((sc.shards, "shards"), (sc.val_shards, "val_shards")):
                if not spec:
                    continue
                try:
                    list_shards(spec, f"{where}.{field}")
                except FileNotFoundError as e:
                    problems.append(str(e))
    return problems


def check_inputs(cfg: JobConfig, deepspeed: str) -> None:
    """ConfigError listing every problem of `input_problems`, if any."""
    problems = input_problems(cfg, deepspeed)
    if problems:
        raise ConfigError("invalid inputs:\n  " + "\n  ".join(problems))
