"""The optimizer step on DeepSpeed's ZeRO partitions in tens of kernels, decided by the trainer's
one per-step read.

DeepSpeed 0.19.8's ZeRO-1/2 `step` decides overflow on the host: ~13 small kernels per gradient
tensor (`has_inf_or_nan`), an all-reduce and `.item()`; then it takes the gradient norm tensor by
tensor in fp64 and reads it back again (`is_invalid_grad_norm`); then it runs the optimizer once per
parameter group. ZeRO-3's step has the same norm loop and read. On the 3b structure that is
thousands of operators and several host syncs per step (issue 18), and there is no switch for it.

Here the step is split in two around the trainer's read (training/trainer.py):

- `grad_norm_sq()`, after the last backward of the step: this rank's share of the squared
  gradient norm, on the device, without a read: one `_foreach_norm` over the rank's gradient
  partition (a tensor-parallel-replicated parameter counts on TP rank 0 only, as DeepSpeed counts
  it). ZeRO partitions the gradients over data parallelism and TP shards them, so the sum over the
  whole world (TP x DP) is the squared global norm: the trainer adds it to its one all-reduced flag
  vector and reads that vector once.
- `decide(skip, norm)`, then `engine.step()`: the overridden `step` either discards the gradients
  (DeepSpeed's own overflow path: the engine sees `overflow`, counts a skipped step and leaves the
  learning-rate schedule alone) or scales the flat fp32 gradient partitions by the clipping
  coefficient (a host number now), runs the fused AdamW over all groups in one call, and lets
  DeepSpeed's own code copy the result to the bit16 weights and all-gather them.

The decision is taken on the host before the optimizer's kernels are queued, so a skipped step
costs nothing and no device-side skip (AdamW's `found_inf`) is needed: the one read the step
needs anyway carries it.

Not covered (DeepSpeed's own step runs, with its reads): optimizer or parameter offload, fp16
loss scaling (refused by the config), MoE, Muon. The override is pinned to DeepSpeed 0.19.8 (it
calls private methods of its ZeRO optimizers); `check_deepspeed_version` refuses anything else.
"""

from __future__ import annotations

import logging
import math
import types

import torch
import torch.distributed as dist

from flamingo_dist.config.deepspeed import deepspeed_version_problem
from flamingo_dist.config.schema import ConfigError

log = logging.getLogger(__name__)


def check_deepspeed_version(version: str | None = None) -> None:
    """ConfigError with `deepspeed_version_problem`'s line, if any."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    problem = deepspeed_version_problem(version)
    if problem:
        raise ConfigError(problem)


def clip_coefficient(norm: float, clip: float) -> float:
    """What the gradients are multiplied by: DeepSpeed's `unscale_and_clip_grads` at loss scale 1
    (divide by max(1, (norm + 1e-6) / clip))."""
    if clip <= 0.0:
        return 1.0
    return 1.0 / max(1.0, (norm + 1e-6) / clip)


class FusedZeroStep:
    """Installed on a DeepSpeed engine's ZeRO optimizer (`install`); the trainer calls
    `grad_norm_sq()` after the step's last backward and `decide()` before `engine.step()`."""

    def __init__(self, optimizer, stage: int):
        self.opt, self.stage = optimizer, stage
        self.decision: tuple[bool, float] | None = None
        # the engine calls optimizer.step(): this instance's own method now (clipping at the
        # optimizer's `clip_grad`, DeepSpeed's gradient_clipping = train.grad_clip)
        optimizer.step = types.MethodType(_zero3_step if stage == 3 else _zero12_step, optimizer)
        optimizer._flamingo_step = self

    # ------------------------------------------------------------ before the read
    def _norm_lists(self) -> list[list[torch.Tensor]]:
        """This rank's gradient partitions whose squares belong to the global norm, grouped."""
        opt, out = self.opt, []
        mp_rank0 = opt.model_parallel_rank == 0
        from deepspeed.runtime.utils import is_model_parallel_parameter

        if self.stage == 3:
            for i, params in enumerate(opt.fp16_groups):
                grads = opt.averaged_gradients.get(i)
                if grads is None:
                    continue
                every = opt._grad_norm_counts_every_rank(params, opt._get_param_partition_group(params[0]))
                out.append([g for g, p in zip(grads, params) if every or mp_rank0 or is_model_parallel_parameter(p)])
        else:
            for i, grads in opt.averaged_gradients.items():
                if grads is None:
                    continue
                flat = opt._get_preflattened_grad_partition(i)
                if flat is not None and opt.model_parallel_world_size == 1:  # every tensor counts: one norm
                    out.append([flat])
                    continue
                real = [g for g in grads if not getattr(g, "_zero_padding", False)]
                out.append([g for g, p in zip(real, opt.params_in_partition[i])
                            if mp_rank0 or is_model_parallel_parameter(p)])
        return out

    def grad_norm_sq(self, device) -> torch.Tensor:
        """This rank's share of the squared global gradient norm (fp32 0-d tensor, no read)."""
        grads = [g for group in self._norm_lists() for g in group]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch.linalg.vector_norm(torch.stack(norms)).square()

    # ------------------------------------------------------------ after the read
    def decide(self, skip: bool, norm: float) -> None:
        """What the next `engine.step()` does: discard the gradients, or clip by `norm` and step."""
        self.decision = (bool(skip), float(norm))

    def take(self) -> tuple[bool, float]:
        if self.decision is None:
            raise RuntimeError("internal: the ZeRO step ran without the trainer's decision "
                               "(FusedZeroStep.decide before engine.step at the accumulation boundary)")
        decision, self.decision = self.decision, None
        return decision


def _zero12_step(self, closure=None):
    """DeepSpeedZeroOptimizer.step (0.19.8) without its host decisions: see the module docstring."""
    from deepspeed.runtime.utils import all_gather_dp_groups
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    skip, norm = self._flamingo_step.take()
    self.micro_step_id = INITIAL_MICRO_STEP_ID
    if skip:  # DeepSpeed's overflow path
        self.overflow = True
        self._global_grad_norm = float("inf")
        self.zero_grad(set_to_none=True)
        self._release_preflattened_grad_buffers()
        for k in list(self.averaged_gradients.keys()):
            self.averaged_gradients[k] = None
            self.all_grad_tensors[k] = None
        return
    self.overflow = False
    self._global_grad_norm = norm
    coef = clip_coefficient(norm, self.clip_grad)
    for i in range(len(self.bit16_groups)):
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        flat = self._get_preflattened_grad_partition(i)
        if flat is None:
            if partition_id == dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
                flat = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
            else:
                flat = self.flatten(self.averaged_gradients[i])
        fp32 = self.single_partition_of_fp32_groups[i]
        grad = flat.to(fp32.dtype)
        if grad.numel() != self.partition_size[i]:
            raise RuntimeError(f"internal: gradient partition of group {i} has {grad.numel()} elements, "
                               f"the partition {self.partition_size[i]}")
        if coef != 1.0:
            grad.mul_(coef)
        fp32.grad = grad
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
    self.optimizer.step()  # every group in one call: the fused AdamW, one kernel per group
    self._lazy_init_hp_params_optimizer_state()
    for i in range(len(self.bit16_groups)):
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        fp32 = self.single_partition_of_fp32_groups[i]
        fp32.grad = None
        self.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(fp32.data)
    all_gather_dp_groups(groups_flat=self.bit16_groups_flat, partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                         dp_process_group=self.real_dp_process_group, start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)


def _zero3_step(self, closure=None):
    """DeepSpeedZeroOptimizer_Stage3.step (0.19.8) without its host decisions."""
    skip, norm = self._flamingo_step.take()
    self._pre_step()
    self._partition_all_parameters()
    self.overflow = skip
    self._update_scale(skip)
    if skip:  # DeepSpeed's overflow path
        self._global_grad_norm = float("inf")
        self._overflow_clean_up(self.loss_scale)
        return
    self._global_grad_norm = norm
    coef = clip_coefficient(norm, self.clip_grad)
    timer_names: set = set()
    self.zero_grad(set_to_none=True)
    for sub_group_id in range(len(self.fp16_groups)):
        self._prepare_sub_group(sub_group_id, timer_names)
        if coef != 1.0:
            self.fp32_partitioned_groups_flat[sub_group_id].grad.mul_(coef)
        self._optimizer_step(sub_group_id)
        self._reassign_or_swap_out_partitioned_parameters(sub_group_id)
        self._release_sub_group(sub_group_id, timer_names)
    self._post_step(timer_names)


def install(engine) -> FusedZeroStep | None:
    """Put the fused step on the engine's ZeRO optimizer; None (DeepSpeed's own step stays, with
    its reads) where it does not apply, logged once."""
    check_deepspeed_version()
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    reason = None
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        stage = 3
        if opt.offload_optimizer or opt.offload_param:
            reason = "optimizer or parameter offload"
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        stage = engine.zero_optimization_stage()
        if opt.cpu_offload:
            reason = "optimizer offload"
    else:
        stage, reason = 0, f"{type(opt).__name__} is not a ZeRO optimizer"
    if reason is None and getattr(opt, "use_muon", False):
        reason = "Muon"
    if reason is None and getattr(opt, "has_moe_layers", False):
        reason = "MoE layers"
    if reason is None and not math.isclose(float(opt.loss_scale), 1.0):
        reason = "loss scaling"
    if reason is not None:
        log.info(f"fused ZeRO step not used ({reason}): DeepSpeed's own step runs, with its host reads")
        return None
    return FusedZeroStep(opt, stage)
