"""The pieces of one optimizer step, composed by `Trainer.train_step`, each testable alone:

- `account`: batch accounting. The loader's host numbers of every micro-batch (labelled tokens,
  images, documents: data/processing.py `collate`) per source, and the factor each micro-batch's
  mean loss is multiplied by before backward (needs the step's labelled tokens per source over
  the data-parallel ranks: one all-reduce on the device, nothing read back).
- `read_step`: the one per-step read. Everything the host must decide after the step's last
  backward travels in one float64 vector, all-reduced (sum) over the world and read once: this
  rank's share of the squared gradient norm (training/zero_step.py), how many micro-batch losses
  were not finite, the stop signal, rank 0's "a timed checkpoint is due", a data error, and the
  step's loss sums, labelled tokens, images and documents per source. Nothing else in a step
  reads the device (statistics that are not decisions wait for the logged steps).
- `step_metrics`: the step's metrics from the read, in Python.

Why sums over the world work: the world is TP x DP. The squared norm's shares add up across both
(TP shards and ZeRO partitions are disjoint; replicated tensors count on TP rank 0 only); flags
only need "more than zero"; a quantity every TP rank holds alike (losses, the loader's numbers) is
summed TP times and divided by the TP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepBatches:
    """One optimizer step's micro-batches and what the host knows of them."""

    items: list[dict]  # the micro-batches
    source_of: list[int]  # the source index of each micro-batch
    tokens: list[int]  # labelled tokens of each micro-batch (the loader's number)
    loss_scales: list  # what each micro-batch's mean loss is multiplied by before backward
    images: list[int]
    documents: list[int]


def account(items: list[tuple[int, dict]], num_sources: int, weights: list[float], dp_size: int, dp_group,
            device) -> StepBatches:
    """Batch accounting of `items`, (source index, micro-batch) pairs. The objective is
    sum_s weight_s * L_s, L_s being source s's mean token loss over the whole global batch: each
    micro-batch's mean loss is weighted by weight_s times its share of source s's labelled tokens
    over all micro-batches and data-parallel ranks, and DeepSpeed's 1/accumulation and 1/dp
    averaging is undone, so the gradient and the logged loss are the same in every layout
    (DP x accumulation) with the same global batch."""
    source_of = [src_index for src_index, _ in items]
    host = [b["_host"] for _, b in items]
    tokens = [h["labelled_tokens"] for h in host]
    gas = len(items)  # DeepSpeed's accumulation: one micro-step per micro-batch
    local = [0.0] * num_sources
    for s, t in zip(source_of, tokens):
        local[s] += t
    numerators = [weights[s] * t * dp_size * gas for s, t in zip(source_of, tokens)]
    if dp_size > 1:
        totals = torch.tensor(local, dtype=torch.float32, device=device)
        dist.all_reduce(totals, group=dp_group)  # on the device: nothing read back
        per_batch = totals.clamp(min=1.0)[torch.tensor(source_of, device=device)]
        factors = torch.tensor(numerators, dtype=torch.float32, device=device) / per_batch
        scales = list(factors.unbind())
    else:
        scales = [num / max(1.0, local[s]) for num, s in zip(numerators, source_of)]
    return StepBatches([b for _, b in items], source_of, tokens, scales, [h["images"] for h in host],
                       [h["documents"] for h in host])


@dataclass
class StepRead:
    """The step as every rank learned it from the one read (global over the world)."""

    grad_norm: float | None  # None when the norm is not ours to take (DeepSpeed's own step decides)
    non_finite_losses: int
    stop: bool
    save_due: bool
    data_error: bool
    loss_sums: list[float]  # per source: sum of (mean loss x labelled tokens) of its finite micro-batches
    tokens: list[float]
    images: list[float]
    documents: list[float]
    rank_seconds: list[float] | None = None  # each rank's host time in the step outside collectives (stragglers)

    @property
    def skip(self) -> bool:
        """The optimizer step must be discarded on every rank."""
        return self.non_finite_losses > 0 or (self.grad_norm is not None and not math.isfinite(self.grad_norm))


def read_step(step: StepBatches, losses: list[torch.Tensor], norm_sq: torch.Tensor | None, num_sources: int,
              flags: tuple[bool, bool, bool], tp_size: int, world_size: int, device,
              own_seconds: tuple[int, float] | None = None) -> StepRead:
    """The one per-step read. `losses`: each micro-batch's mean loss (detached, on the device);
    `norm_sq`: this rank's share of the squared gradient norm, or None (not ours to take);
    `flags`: this rank's (stop signal, timed checkpoint due, data error); `own_seconds`: (this
    rank, its host seconds in the step outside collectives), one slot per rank in the vector."""
    n, J = num_sources, len(losses)
    # host numbers in one copy: per micro-batch its labelled tokens in its source's column, then
    # the flags and this rank's tokens, images and documents per source
    per_source = [[0.0] * n for _ in range(3)]
    onehot = [0.0] * (J * n)
    for j, s in enumerate(step.source_of):
        onehot[j * n + s] = float(step.tokens[j])
        for k, value in enumerate((step.tokens[j], step.images[j], step.documents[j])):
            per_source[k][s] += value
    per_rank = [0.0] * (world_size if own_seconds is not None else 0)
    if own_seconds is not None:
        per_rank[own_seconds[0]] = own_seconds[1]
    host = torch.tensor(onehot + [float(f) for f in flags] + [v for row in per_source for v in row] + per_rank,
                        dtype=torch.float64, device=device)
    loss_J = torch.stack(losses).to(torch.float64)
    finite_J = torch.isfinite(loss_J)
    loss_sums = torch.where(finite_J, loss_J, 0.0) @ host[: J * n].view(J, n)
    norm = (norm_sq.to(torch.float64) if norm_sq is not None else torch.zeros((), dtype=torch.float64, device=device))
    vec = torch.cat([norm.reshape(1), (~finite_J).sum().to(torch.float64).reshape(1), loss_sums, host[J * n:]])
    if world_size > 1:
        dist.all_reduce(vec)
    v = vec.tolist()  # the step's one read
    # v: squared norm, non-finite losses, loss sums [n], stop, save due, data error, tokens [n],
    # images [n], documents [n], then one slot per rank; what every TP rank holds alike was summed
    # tp_size times
    ranks = v[len(v) - len(per_rank):] if per_rank else None
    same = [x / tp_size for x in v[2: 2 + n] + v[5 + n: len(v) - len(per_rank)]]
    return StepRead(grad_norm=math.sqrt(v[0]) if norm_sq is not None else None,
                    non_finite_losses=int(round(v[1] / tp_size)), stop=v[2 + n] > 0, save_due=v[3 + n] > 0,
                    data_error=v[4 + n] > 0, loss_sums=same[:n], tokens=same[n: 2 * n], images=same[2 * n: 3 * n],
                    documents=same[3 * n:], rank_seconds=ranks)


def step_metrics(read: StepRead, weights: list[float], names: list[str], lr: float, grad_norm: float,
                 applied: bool, skipped_steps: int, elapsed: float) -> dict[str, float]:
    """The step's metrics, from the read (Python only)."""
    loss = [s / max(1.0, t) for s, t in zip(read.loss_sums, read.tokens)]
    bad = read.non_finite_losses > 0
    metrics = {
        "loss": sum(w * x for w, x in zip(weights, loss)) if not bad else float("nan"),
        "lr": lr,
        "grad_norm": grad_norm if applied else float("nan"),
        "tokens_per_s": sum(read.tokens) / elapsed,
        "images_per_s": sum(read.images) / elapsed,
        "step_time_s": elapsed,
        "skipped_steps": float(skipped_steps),
        "step_applied": float(applied),
    }
    if read.rank_seconds:  # stragglers: the slowest rank's own work against the fastest's
        slowest = max(range(len(read.rank_seconds)), key=read.rank_seconds.__getitem__)
        metrics["rank_time/max_s"] = read.rank_seconds[slowest]
        metrics["rank_time/min_s"] = min(read.rank_seconds)
        metrics["rank_time/slowest_rank"] = float(slowest)
    if len(names) > 1 or names[0] != "main":
        for i, name in enumerate(names):
            metrics[f"loss/{name}"] = loss[i] if not bad else float("nan")
            metrics[f"tokens_per_s/{name}"] = read.tokens[i] / elapsed
            metrics[f"images_per_s/{name}"] = read.images[i] / elapsed
            metrics[f"documents_per_s/{name}"] = read.documents[i] / elapsed
    return metrics
