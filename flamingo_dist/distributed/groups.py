"""Process groups: world = TP x DP, built by megatron-core's `parallel_state`, plus the `mpu`
adapter DeepSpeed needs so that ZeRO partitions only across data parallelism.

Works unchanged under `deepspeed`, `torchrun`, SLURM (env vars set by the launcher) and a plain
`python` (a world of one). CPU uses gloo, GPU nccl.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

_STORE_DIR: str | None = None  # the file store of a world of one (removed by destroy_distributed or at exit)


@dataclass
class Layout:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device


def init_distributed(tp_size: int, timeout_minutes: int = 30) -> Layout:
    """Initialise torch.distributed from the launcher's environment and megatron's TP/DP groups."""
    from megatron.core import parallel_state

    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single:  # plain `python train.py` or a one-process launch: nothing to rendezvous with
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # Share the cores among the ranks of this host rather than oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if single:
            # A private file store, not a TCP port: an inherited or reused MASTER_PORT cannot collide.
            global _STORE_DIR
            _STORE_DIR = tempfile.mkdtemp(prefix="flamingo_dist_pg_")
            atexit.register(shutil.rmtree, _STORE_DIR, ignore_errors=True)  # also when destroy is never called
            store = os.path.join(_STORE_DIR, "store")
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)  # env:// from the launcher
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"parallel.tensor_parallel_size ({tp_size}) must divide the world size ({world})")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                                 create_gloo_process_groups=False)
    return Layout(rank=dist.get_rank(), world_size=world, local_rank=local_rank, tp_size=tp_size,
                  tp_rank=parallel_state.get_tensor_model_parallel_rank(), dp_size=world // tp_size,
                  dp_rank=parallel_state.get_data_parallel_rank(), device=device)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    global _STORE_DIR
    if _STORE_DIR is not None:  # the world-of-one file store
        shutil.rmtree(_STORE_DIR, ignore_errors=True)
        _STORE_DIR = None


def tp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def dp_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


class MegatronMPU:
    """The `mpu` interface DeepSpeed reads (model- and data-parallel rank, size, group). megatron
    0.16's parallel_state dropped `get_model_parallel_*`; with no pipeline parallelism the model
    parallel group is the tensor-parallel group."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return None
