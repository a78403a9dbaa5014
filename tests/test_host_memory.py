"""train.cpu_keep_freed_memory: on CPU the same large buffers are allocated every step; glibc's
defaults unmap each freed block above its mmap threshold, so the next step faults every page in
again. `keep_freed_host_memory` makes the process reuse them."""

import json
import subprocess
import sys

import pytest
import torch

# One process per setting: the allocator setting is process-wide and cannot be undone.
PROBE = """
import json, resource, sys
import torch
from flamingo_dist.training.engine import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: twice glibc's largest mmap threshold
    buf.fill_(1)  # touch every page
    del buf
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_buffer_is_reused_without_faulting_its_pages_in_again():
    pages = 64 * 2**20 // 4096
    default, kept = probe("default"), probe("keep")
    assert kept["applied"] is True
    # glibc's default: every round maps a fresh block and faults all of its pages in (the control
    # that shows this test can fail)
    assert min(default["faults"][1:]) > pages // 2
    # kept: the first rounds fault pages in (glibc may place a block anew while its free list
    # settles), the later rounds reuse them
    assert kept["faults"][0] > pages // 2
    assert max(kept["faults"][-4:]) < pages // 20


@pytest.mark.parametrize("cuda", [False, True])
def test_freed_memory_is_kept_only_when_training_on_the_cpu(monkeypatch, cuda):
    """On a GPU the model is built on the CPU too (megatron's CPU initialisation) and moved by
    DeepSpeed: the host must not keep the memory it held then."""
    from flamingo_dist.config.schema import JobConfig
    from flamingo_dist.training import engine

    calls = []
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(engine, "keep_freed_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(engine, "apply_freeze", lambda model: None)
    monkeypatch.setattr(engine, "apply_deepspeed", lambda model, cfg, ds_config, mpu, device: "engine")
    model = torch.nn.Linear(2, 2)  # on the CPU in both cases, as the real model is here
    assert engine.parallelize(model, JobConfig(), {}, None, torch.device("cpu")) == "engine"
    assert calls == ([] if cuda else [1])
