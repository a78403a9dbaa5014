"""Start-up mistakes are found before anything heavy is imported or built: the entry point exits
with status 2 and one `error:` line naming the field or file; the traceback only with --debug."""

import json
import os
import subprocess
import sys

import pytest
import shardkit
from conftest import REPO

HEAVY = ("torch", "deepspeed", "transformers", "megatron", "open_clip", "mlflow", "webdataset")
PROBE = ("import sys, time; t0 = time.time(); from flamingo_dist.train import main; code = main(sys.argv[1:]); "
         "print({'heavy': [m for m in %r if m in sys.modules], 's': round(time.time() - t0, 2)}); sys.exit(code)"
         % (HEAVY,))


def run_entry(*args):
    """flamingo_dist/train.py's main in a fresh interpreter: (exit code, stderr lines, heavy modules
    imported, seconds)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "--deepspeed", "ds_configs/zero2.json", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    probe = eval(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"heavy": None, "s": None}
    return proc.returncode, proc.stderr.splitlines(), probe["heavy"], probe["s"]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """{mistake: (arguments, what the one line must name)}."""
    d = tmp_path_factory.mktemp("mistakes")
    shard = shardkit.write_tar(str(d / "docs-00000.tar"), [{"__key__": "a", "txt": "x ."}])
    (d / "run").mkdir()
    (d / "mistral").mkdir()
    (d / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": [
        "MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4}))
    (d / "bad.yaml").write_text("train:\n  lr: [0.1,\n  steps: 3\n")
    own_lm = ["--set", "model.synthetic_backbones=null"]
    return {
        "missing shard": (["--set", f"data.shards={d}/docs-{{00000..00001}}.tar"],
                          "docs-00001.tar does not exist"),
        "resume to a non-checkpoint": (["--resume", str(d / "run")], f"checkpoint.resume: {d / 'run'}"),
        "unsupported LM config": (own_lm + ["--set", f"model.lm.path={d / 'mistral'}"], "MistralForCausalLM"),
        "no tokenizer for shards with a random LM": (own_lm + ["--set", f"data.shards={shard}"], "data.tokenizer"),
        "YAML syntax": (["--config", str(d / "bad.yaml")], f"--config {d / 'bad.yaml'}: not valid YAML"),
    }


CASES = ["missing shard", "resume to a non-checkpoint", "unsupported LM config",
         "no tokenizer for shards with a random LM", "YAML syntax"]


@pytest.mark.parametrize("case", CASES)
def test_a_start_up_mistake_is_one_line_before_any_heavy_import(mistakes, case):
    args, names = mistakes[case]
    code, err, heavy, seconds = run_entry(*args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert heavy == [], heavy  # found before torch and the rest are imported (well under 2 s: see seconds)


def test_debug_shows_the_traceback(mistakes):
    args, names = mistakes["YAML syntax"]
    code, err, _, _ = run_entry(*args, "--debug")
    assert code == 2 and any("Traceback" in line for line in err) and err[-1].startswith("error: ")


def test_a_directory_of_checkpoints_is_pointed_to_its_newest(tmp_path):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.training.inputs import input_problems

    for step in (10, 20):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "COMMITTED.json").write_text("{}")
    problems = input_problems(load_config(None, [f"checkpoint.resume={tmp_path}"]),
                              os.path.join(REPO, "ds_configs/zero2.json"))
    assert len(problems) == 1 and str(tmp_path / "step_00000020") in problems[0], problems


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device trains with FlexAttention")
def test_flex_attention_without_a_gpu_is_refused_at_start_up():
    code, err, _, _ = run_entry("--set", "model.packed_attention=flex")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model.packed_attention: flex"), err
    code, err, _, _ = run_entry("--set", "model.packed_attention=flash")
    assert code == 2 and "model.packed_attention: 'flash' is not mask or flex" in err[0], err


def test_another_deepspeed_is_refused_in_one_line_unless_the_fused_step_is_off(monkeypatch):
    """training/zero_step.py overrides private methods of DeepSpeed 0.19.8's ZeRO optimizers: any
    other version is one start-up line naming both ways out; train.fused_zero_step=false lifts it."""
    import importlib.metadata

    from flamingo_dist.config.deepspeed import deepspeed_version_problem
    from flamingo_dist.config.load import load_config
    from flamingo_dist.training.inputs import input_problems

    assert deepspeed_version_problem("0.19.8") is None and deepspeed_version_problem("0.19.8+cu130") is None
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.1" if name == "deepspeed" else real(name))
    ds = os.path.join(REPO, "ds_configs", "zero2.json")
    problems = input_problems(load_config(None, []), ds)
    assert len(problems) == 1 and "DeepSpeed 0.20.1 is installed" in problems[0]
    assert "pip install deepspeed==0.19.8" in problems[0] and "train.fused_zero_step=false" in problems[0]
    assert input_problems(load_config(None, ["train.fused_zero_step=false"]), ds) == []
