"""Config: validation that names every bad field at once, DeepSpeed "auto" filling, the
generated reference, and a lean start-up."""

import json
import os
import subprocess
import sys

import pytest

from flamingo_dist.config.load import load_config, validate
from flamingo_dist.config.schema import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, env=None):
    """The real entry point in a fresh interpreter; returns (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "flamingo_dist/train.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("sets,field", [
    (["train.lr=-1"], "train.lr"),
    (["train.precision=fp16"], "train.precision"),
    (["model.lm.path=/nonexistent/llama"], "model.lm.path"),
    (["parallel.tensor_parallel_size=3"], "parallel.tensor_parallel_size"),
    (["model.lm.num_kv_heads=3"], "model.lm.num_kv_heads"),
    (["train.steps=ten"], "train.steps"),
    (["train.nonsense=1"], "train.nonsense"),
    (["train.lr_scales={gate: 10}"], "train.lr_scales"),
    (["train.lr_scales={gates: 0}"], "train.lr_scales"),
    (["eval.synthetic_tasks=[synthetic_vqa]"], "eval.synthetic_tasks"),
    (["eval.attribute_words={color: red}"], "eval.attribute_words"),
    (["model.vision.pretrained=/some/vit.pt"], "model.synthetic_backbones"),
    (["train.spike_rollback=true"], "needs checkpoints to roll back to"),
    (["train.spike_rollback=true", "checkpoint.every_steps=10", "checkpoint.keep_last=1"], "keep_last >= 2"),
    (["train.hang_timeout_s=-1"], "train.hang_timeout_s"),
])
def test_entry_point_fails_at_once_naming_the_field(sets, field):
    code, err = run_train("--deepspeed", "ds_configs/zero2.json", *[a for s in sets for a in ("--set", s)])
    assert code == 2 and field in err, err[-2000:]


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=-1", "parallel.tensor_parallel_size=3", "data.seq_len=4"])
    msg = str(e.value)
    assert "train.lr" in msg and "parallel.tensor_parallel_size" in msg and "data.seq_len" in msg


def test_tp_must_divide_world_size():
    cfg = load_config(None, ["parallel.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="world size"):
        validate(cfg, world_size=3)


def test_yaml_selects_values_and_reads_exponents(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("flavor: debug\ntrain:\n  lr: 3e-4\n  betas: [0.9, 0.95]\nmodel:\n  xattn:\n    alpha_type: vector\n")
    cfg = load_config(str(path), ["train.steps=7"])
    assert (cfg.train.lr, cfg.train.betas, cfg.model.xattn.alpha_type, cfg.train.steps) == (3e-4, (0.9, 0.95), "vector", 7)


@pytest.mark.parametrize("flavor", ["debug", "3b", "9b", "80b"])
def test_flavors_validate(flavor):
    cfg = load_config(None, [f"flavor={flavor}"])
    assert cfg.flavor == flavor


def test_deepspeed_auto_is_filled_and_contradictions_are_errors():
    from flamingo_dist.config.deepspeed import resolve_ds_config

    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum_steps=2", "train.precision=fp32"])
    ds = resolve_ds_config(os.path.join(REPO, "ds_configs/zero2.json"), cfg, dp_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds
    with open(os.path.join(REPO, "ds_configs/zero2.json")) as f:
        raw = json.load(f)
    raw["train_micro_batch_size_per_gpu"] = 5
    raw["optimizer"]["params"]["lr"] = 0.5
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(raw, cfg, dp_size=1)
    assert "train_micro_batch_size_per_gpu" in str(e.value) and "optimizer.params.lr" in str(e.value)
    raw = {"scheduler": {"type": "WarmupLR"}}
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config(raw, cfg, dp_size=1)
    with pytest.raises(ConfigError, match="check_grad_overflow"):  # non-finite steps must be skipped
        resolve_ds_config({"bf16": {"enabled": "auto", "check_grad_overflow": False}}, cfg, dp_size=1)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_resolve(name):
    from flamingo_dist.config.deepspeed import resolve_ds_config

    ds = resolve_ds_config(os.path.join(REPO, "ds_configs", f"{name}.json"), load_config(), dp_size=2)
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)


def test_config_reference_is_current_and_complete():
    from flamingo_dist.config.docs import field_docs, render

    missing = [f"{c}.{f}" for c, fields in field_docs().items() for f, d in fields.items() if not d]
    assert missing == [], f"fields without a docstring: {missing}"
    with open(os.path.join(REPO, "docs/config.md")) as f:
        assert f.read() == render(), "docs/config.md is stale: run python tools/gen_config_docs.py"


def test_entry_point_import_is_lean():
    """Parsing and validating the config imports none of the heavy stack."""
    code = ("import sys; import flamingo_dist.train as t; from flamingo_dist.config.load import load_config; load_config();"
            "heavy = [m for m in ('deepspeed', 'mlflow', 'transformers', 'megatron', 'open_clip', 'webdataset', 'torch')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_missing_deepspeed_config_is_an_error():
    code, err = run_train("--deepspeed", "ds_configs/nope.json")
    assert code == 2 and "ds_configs/nope.json" in err


def test_data_sources_are_checked_entry_by_entry():
    bad = ("data.sources=[{name: a, format: laion, shards: x}, {name: a, shards: y, weight: 0, colour: red}, "
           "{name: v, format: video, shards: z}, {format: pairs}]")
    with pytest.raises(ConfigError) as e:
        load_config(None, [bad, "data.streams=3"])
    msg = str(e.value)
    for part in ("data.sources[0].format: 'laion' is not one of obelics, mmc4, pairs, video",
                 "data.sources[1].colour: unknown field", "data.sources[1].weight: must be positive",
                 "data.sources[2]: a video source needs model.resampler.max_frames >= data.frames_per_video (0 < 8)",
                 "data.sources[3].name: required", "data.sources[3].shards: required",
                 "data.sources: names must be unique"):
        assert part in msg, (part, msg)
    with pytest.raises(ConfigError, match=r"data.streams \(3\) must be a multiple of data-parallel size x loader "
                                          r"workers \(2 x 1\)"):
        validate(load_config(None, ["data.streams=3"]), world_size=2)
    ok = load_config(None, ["data.sources=[{name: a, shards: x, micro_batch_size: 0}]", "train.micro_batch_size=6"])
    from flamingo_dist.config.load import source_configs

    assert [(s.name, s.format, s.micro_batch_size, s.weight) for s in source_configs(ok)] == [("a", "obelics", 6, 1.0)]
