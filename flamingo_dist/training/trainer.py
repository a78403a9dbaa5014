"""A small trainer with named phases: build, train, train_step, close.

Non-finite steps: each micro-batch's "loss is finite" flag is all-reduced over the world before
its backward, so every rank knows together. DeepSpeed then discards the whole optimizer
step through its own overflow path (the global gradient norm, itself a collective, is
non-finite: gradients zeroed, optimizer and schedule untouched) and we count it. A finite loss
whose gradient norm is not finite is discarded the same way. Too many skipped steps in a row
stop the run with a message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flamingo_dist.config.schema import JobConfig
from flamingo_dist.data.layout import labelled_tokens
from flamingo_dist.data.processing import normalize_pixels

log = logging.getLogger(__name__)

class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, say); the message says why."""


@dataclass
class TrainState:
    step: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    tokens_seen: int = 0


def _dtype(cfg: JobConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


class Trainer:
    def __init__(self, cfg: JobConfig, ds_config_path: str | dict, layout):
        self.cfg, self.layout = cfg, layout
        self.state = TrainState()
        self.ds_config_path = ds_config_path
        self.tracker = None
        self.run_id: str | None = None  # the MLflow run, kept across resumes
        self.saved_data: dict | None = None  # the data position of the checkpoint resumed from
        self.feed = None  # flamingo_dist.data.feed.DataFeed: batches of every source
        self._val_batches: dict | None = None  # validation micro-batches per source, drawn once
        self.stop_flag = None  # a flamingo_dist.distributed.slurm.StopFlag: stop (saving) at the next step boundary
        self.stopped = False  # training ended early on a stop signal, after a committed checkpoint
        self._eval_tasks: dict | None = None  # the evaluation sets, read at the first evaluation

    # ---------------------------------------------------------------- build
    def build(self, track: bool = True) -> "Trainer":
        from flamingo_dist.config.deepspeed import resolve_ds_config
        from flamingo_dist.data.feed import DataFeed
        from flamingo_dist.distributed.groups import MegatronMPU, dp_group, tp_group
        from flamingo_dist.eval.attributes import attribute_ids
        from flamingo_dist.hf.llama import load_tokenizer
        from flamingo_dist.training.build import build_model, resolve_model_config
        from flamingo_dist.training.engine import parallelize

        cfg, lay = self.cfg, self.layout
        self.synthetic_backbones = cfg.model.synthetic_backbones  # resolving points the LM and ViT into it
        self._on_writers(self._build_backbones)
        for note in resolve_model_config(cfg.model):
            self.log(note)
        ds_config = self.ds_config = resolve_ds_config(self.ds_config_path, cfg, lay.dp_size)
        self.sources, self.val_shards, tok_dir = self._data_sources()
        self.tokenizer = load_tokenizer(tok_dir, cfg.model.lm.vocab_size)
        self.attribute_ids = attribute_ids(cfg, self.tokenizer)
        self.model = build_model(cfg.model, tp_group(), cfg.train.seed, _dtype(cfg))
        if self.model.vision.image_size != cfg.data.image_size:
            raise ValueError(f"data.image_size ({cfg.data.image_size}) must equal the vision encoder's "
                             f"input size ({self.model.vision.image_size})")
        self.engine = parallelize(self.model, cfg, ds_config, MegatronMPU())
        self.device = self.engine.device
        if cfg.eval.every_steps and self.engine.zero_optimization_partition_weights() and lay.dp_size > 1:
            from flamingo_dist.config.schema import ConfigError

            raise ConfigError("eval.every_steps: evaluation during training does not run under ZeRO-3 with data "
                              "parallelism (ranks evaluate different queries, so their forward passes over the "
                              "partitioned weights would not line up); use ZeRO-1/2, or evaluate checkpoints "
                              "with tools/evaluate.py")
        self.dp_group = dp_group()
        if cfg.checkpoint.resume:
            self._resume(cfg.checkpoint.resume)
        else:
            from flamingo_dist.config.schema import checkpoint_dir
            from flamingo_dist.training import checkpoint

            root = checkpoint_dir(cfg)
            if checkpoint.committed(root):  # a fresh run never overwrites an earlier run's checkpoints
                aside = f"{root}.before-{time.strftime('%Y%m%d-%H%M%S')}"
                if lay.rank == 0:
                    os.rename(root, aside)
                dist.barrier()
                self.log(f"warning: {root} held committed checkpoints but this run starts fresh (pass --resume auto "
                         f"to continue from them); moved them to {aside}")
        # the loaders start at the data position the resume restored; their workers leave SLURM's
        # stop signal to this process (it saves a checkpoint, then the workers are shut down)
        from flamingo_dist.distributed.slurm import ignore_stop_signals

        self.feed = DataFeed(cfg, self.sources, self.tokenizer, lay.dp_rank, lay.dp_size, self.dp_group, self.device,
                             self.saved_data, worker_init_fn=ignore_stop_signals)
        described = [f"{s.name} ({s.format}, {len(s.shards)} shards, weight {s.weight:g}, micro-batch "
                     f"{s.micro_batch_size})" for s in self.sources]
        self.log(f"data: {', '.join(described)}; {self.feed.num_streams} streams per source, "
                 f"from slot {self.feed.start}")
        if track:
            from flamingo_dist.training.tracking import Tracker

            self.tracker = Tracker(cfg.tracking, cfg, lay, run_name=cfg.flavor, run_id=self.run_id)
            self.run_id = self.tracker.run_id
        return self

    def _resume(self, spec: str) -> None:
        from flamingo_dist.config.schema import checkpoint_dir
        from flamingo_dist.training import checkpoint

        path = checkpoint.resolve_resume(spec, checkpoint_dir(self.cfg))
        if path is None:
            self.log(f"resume auto: no committed checkpoint in {checkpoint_dir(self.cfg)}; starting fresh")
            return
        checkpoint.load(self, path)
        self.log(f"resumed from {path} at step {self.state.step}")

    # ---------------------------------------------------------------- checkpoint contract
    def state_dict(self) -> dict:
        """Collective: what a checkpoint keeps of the trainer besides the engine and the RNG (JSON):
        the counters, the MLflow run, every stream's data position."""
        return {**dataclasses.asdict(self.state), "run_id": self.run_id, "data": self.feed.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        """The inverse of `state_dict` (before the data feed is built: it starts from `saved_data`)."""
        fields = {f.name for f in dataclasses.fields(self.state)}
        self.state = TrainState(**{k: v for k, v in saved.items() if k in fields})
        self.run_id = saved.get("run_id")
        self.saved_data = saved["data"]

    def save_checkpoint(self) -> str:
        from flamingo_dist.config.schema import checkpoint_dir
        from flamingo_dist.training import checkpoint

        root = checkpoint_dir(self.cfg)
        path = checkpoint.save(self, root)
        self._last_save = (self.state.step, time.time())
        self.log(f"checkpoint committed: {path}")
        checkpoint.prune(root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every, self.layout.rank)
        return path

    def _save_due(self) -> bool:
        """Every N steps, or every M minutes as decided on rank 0 and broadcast."""
        ck, step = self.cfg.checkpoint, self.state.step
        if ck.every_steps and step % ck.every_steps == 0:
            return True
        if ck.every_minutes:
            due = torch.tensor([float(time.time() - self._last_save[1] >= 60 * ck.every_minutes)], device=self.device)
            dist.broadcast(due, src=0)
            return bool(due.item())
        return False

    def evaluate(self) -> dict:
        """Collective: the configured few-shot evaluation of the current weights, logged to the
        MLflow run (eval/<task>/<shots>shot_<method>) and written to <run_dir>/eval/step_<N>.json."""
        from flamingo_dist.eval import fewshot
        from flamingo_dist.eval import tasks as eval_tasks

        ev, lay, run_dir = self.cfg.eval, self.layout, self.cfg.tracking.run_dir
        if self._eval_tasks is None:
            suite = {}
            if ev.synthetic:
                where = os.path.join(run_dir, "eval_tasks")
                if lay.rank == 0:
                    eval_tasks.synthetic_suite(where)
                dist.barrier()
                suite.update({n: t for n, t in eval_tasks.synthetic_suite(where).items()
                              if not ev.synthetic_tasks or n in ev.synthetic_tasks})
            if ev.tasks_file:
                import yaml

                with open(ev.tasks_file) as f:
                    for spec in yaml.safe_load(f):
                        name, kind, queries, support = eval_tasks.load_task(spec, os.path.dirname(ev.tasks_file))
                        suite[name] = (kind, queries, support)
            self._eval_tasks = {n: (k, q[:ev.max_queries], s) for n, (k, q, s) in suite.items()}
        step = self.state.step
        was_training = self.model.training
        self.model.eval()
        t0 = time.time()
        try:
            results = fewshot.run(
                self.model, self.tokenizer, self._eval_tasks, ev.shots, ev.methods, ev.trials, self.cfg.data.image_size,
                out_json=os.path.join(run_dir, "eval", f"step_{step:08d}.json"), dp_rank=lay.dp_rank,
                dp_size=lay.dp_size, dp_group=self.dp_group, feature_cache=os.path.join(run_dir, "eval", "features"),
                tracker=self.tracker, step=step, seed=self.cfg.train.seed, max_new_tokens=ev.max_new_tokens,
                writer=lay.rank == 0, num_beams=ev.num_beams)
        finally:
            self.model.train(was_training)
            self.model.vision.eval()  # the frozen tower always stays in eval mode
        summary = ", ".join(f"{n}/{c} {v['mean']:.2f}" for n, r in results["tasks"].items() for c, v in r.items())
        self.log(f"eval at step {step} ({time.time() - t0:.1f}s): {summary}")
        return results

    def validate(self) -> dict[str, float]:
        """Collective: validation loss of every source that has held-out shards (the same
        micro-batches every time), val/loss/<source> and their weighted sum val/loss; with
        attribute words, their accuracy with true, shuffled and no images
        (val/accuracy/<condition>_images/<group>, all sources' batches together)."""
        from flamingo_dist.eval.attributes import attribute_accuracy

        if self._val_batches is None:
            self._val_batches = {src.name: self.feed.validation_batches(src, self.val_shards[src.name])
                                 for src in self.sources if src.name in self.val_shards}
        with_val = [src for src in self.sources if src.name in self._val_batches]
        sums = torch.zeros(len(with_val), 2, dtype=torch.float64, device=self.device)
        acc: dict = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for i, src in enumerate(with_val):
                    for batch in self._val_batches[src.name]:
                        tokens = labelled_tokens(batch["labels"])
                        loss, _ = self._forward(batch)
                        sums[i] += torch.tensor([loss.item() * tokens, float(tokens)], dtype=torch.float64,
                                                device=self.device)
                if self.attribute_ids:
                    batches = [b for src in with_val for b in self._val_batches[src.name]]
                    acc = attribute_accuracy(self._logits, batches, self.attribute_ids, self.dp_group, self.device)
        finally:
            self.model.train(was_training)
            self.model.vision.eval()
        if self.dp_group is not None and self.layout.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        losses = (sums[:, 0] / sums[:, 1].clamp(min=1.0)).tolist()
        out = {f"val/loss/{src.name}": v for src, v in zip(with_val, losses)}
        out["val/loss"] = sum(src.weight * v for src, v in zip(with_val, losses))
        for key, value in acc.items():  # true/color -> val/accuracy/true_images/color, majority/color as it is
            kind, group = key.split("/", 1)
            if kind != "count":
                out[f"val/accuracy/{kind if kind == 'majority' else kind + '_images'}/{group}"] = value
        self.log(f"validation at step {self.state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def _logits(self, batch: dict) -> torch.Tensor:
        """Full-vocabulary logits of one micro-batch (gathered over TP)."""
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return self.model.logits(b["input_ids"], normalize_pixels(b["pixel_values"]), b["image_attention_mask"],
                                 position_ids_BT=b["position_ids"], document_ids_BT=b.get("document_ids"))

    def _stop_requested(self) -> bool:
        """Collective: did a stop signal reach any rank? (One all-reduce per step.)"""
        if self.stop_flag is None:
            return False
        flag = torch.tensor([1.0 if self.stop_flag.raised else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _on_writers(self, write) -> None:
        """Collective: `write()` on rank 0 first, then on the first rank of every other host (a
        node-local directory gets its own copy; on a shared filesystem that rank finds rank 0's
        complete one): never two writers at once."""
        lay = self.layout
        for writers in (lay.rank == 0, lay.local_rank == 0 and lay.rank != 0):
            if writers:
                write()
            dist.barrier()

    def _build_backbones(self) -> None:
        from flamingo_dist.demo.backbones import ensure_backbones

        if self.synthetic_backbones:
            m = self.cfg.model
            ensure_backbones(self.synthetic_backbones, m.lm, m.vision.model_name, self.cfg.data.image_size)

    def _data_sources(self):
        """(training sources, validation shards per source, tokenizer directory); the synthetic
        corpus (and its held-out part) is generated when no shards are configured."""
        from flamingo_dist.data.feed import resolve_sources
        from flamingo_dist.data.synthetic import ensure_corpus

        d = self.cfg.data
        if d.sources or d.shards is not None:
            tok_dir = d.tokenizer or self.cfg.model.lm.path or self.cfg.model.init_from
            if tok_dir is None:
                raise ValueError("data.tokenizer: needed when data shards are given and no checkpoint is")
            return (*resolve_sources(self.cfg), tok_dir)
        if (self.cfg.model.lm.path or self.cfg.model.init_from) and not self.synthetic_backbones:
            raise ValueError("data.shards: the synthetic corpus is only for random LMs and the synthetic backbones; "
                             "with a checkpoint give data.shards (its word tokenizer cannot stand in for the "
                             "checkpoint's)")
        vocab = self.cfg.model.lm.vocab_size
        val_dir = os.path.join(d.synthetic_dir, "val") if d.val_every_steps else None

        def write():
            ensure_corpus(d.synthetic_dir, d.synthetic_num_docs, seed=0, side=d.image_size, vocab_size=vocab,
                          max_images=d.max_images)
            if val_dir:
                ensure_corpus(val_dir, d.synthetic_val_docs, seed=1, side=d.image_size, vocab_size=vocab,
                              docs_per_shard=16, max_images=d.max_images)

        self._on_writers(write)
        tok_dir = d.tokenizer or self.cfg.model.lm.path or os.path.join(d.synthetic_dir, "tokenizer")
        return (*resolve_sources(self.cfg, d.synthetic_dir, val_dir), tok_dir)

    def log(self, msg: str) -> None:
        """The trainer's messages (the module logger; printed on rank 0 by flamingo_dist.setup_logging)."""
        log.info(msg)

    # ---------------------------------------------------------------- train
    def train(self) -> TrainState:
        from flamingo_dist.training.tracking import Progress

        t = self.cfg.train
        progress = Progress(t.steps, self.layout.rank, t.log_every)
        self._last_save = (self.state.step, time.time())
        try:
            if self.cfg.eval.at_start and self.state.step == 0:
                self._validate_and_log()
                if self.cfg.eval.every_steps:
                    self.evaluate()
            while self.state.step < t.steps:
                metrics = self.train_step()
                progress.update(self.state.step, metrics)
                if self.cfg.data.val_every_steps and self.state.step % self.cfg.data.val_every_steps == 0:
                    self._validate_and_log()
                if self.state.step % t.log_every == 0:
                    metrics.update(self.gate_values())  # a collective under ZeRO-3: same steps on all ranks
                    metrics.update(self.feed.counters())
                    self._write_metrics(metrics)
                    if self.tracker is not None:
                        self.tracker.log_metrics(metrics, self.state.step)
                if self.state.consecutive_skipped >= t.max_consecutive_skipped_steps:
                    raise TrainingStopped(
                        f"{self.state.consecutive_skipped} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm (train.max_consecutive_skipped_steps = {t.max_consecutive_skipped_steps}); "
                        "stopping. Lower train.lr, check the data, or try train.precision: fp32 to debug.")
                ev = self.cfg.eval
                if ev.every_steps and self.state.step % ev.every_steps == 0:
                    self.evaluate()
                if self._save_due():
                    self.save_checkpoint()
                if self.state.step < t.steps and self._stop_requested():  # the last step just finishes
                    if self._last_save[0] != self.state.step:
                        self.save_checkpoint()
                    self.log(f"stop signal: stopped after step {self.state.step} with a committed checkpoint")
                    self.stopped = True
                    return self.state
            if self.cfg.checkpoint.at_end and self._last_save[0] != self.state.step:
                self.save_checkpoint()
        finally:
            progress.close()
        return self.state

    def _validate_and_log(self) -> None:
        if self.cfg.data.val_every_steps:
            val = self.validate()
            self._write_metrics(val)
            if self.tracker is not None:
                self.tracker.log_metrics(val, self.state.step)

    def _write_metrics(self, metrics: dict) -> None:
        """Rank 0 appends one JSON line per logged step to run_dir/metrics.jsonl (machine-readable
        progress beside MLflow)."""
        if self.layout.rank == 0:
            os.makedirs(self.cfg.tracking.run_dir, exist_ok=True)
            with open(os.path.join(self.cfg.tracking.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.state.step, **metrics}) + "\n")

    def _forward(self, batch: dict):
        """(mean token loss, stats) of one micro-batch on the device."""
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        pixels = normalize_pixels(b["pixel_values"])  # the loader ships uint8: normalised here, on the device
        return self.engine(b["input_ids"], pixels, b["image_attention_mask"], position_ids_BT=b["position_ids"],
                           labels_BT=b["labels"], z_loss=self.cfg.train.z_loss, document_ids_BT=b.get("document_ids"),
                           loss_chunk_tokens=self.cfg.train.loss_chunk_tokens)

    def _check_data_error(self, flag: float) -> None:
        """Collective when any rank's data reported an error (a shard over the skip-rate limit):
        every rank stops with the first rank's message."""
        if flag <= 0:
            return
        messages: list = [None] * dist.get_world_size()
        dist.all_gather_object(messages, self.feed.error)
        raise TrainingStopped(next(m for m in messages if m))

    def train_step(self) -> dict:
        """One optimizer step: grad_accum_steps micro-batches of every source.

        The objective is sum_s weight_s * L_s, L_s being source s's mean token loss over the whole
        global batch. The step's labelled tokens per source over all micro-batches and
        data-parallel ranks are summed before the first backward, each micro-batch's mean loss is
        weighted by weight_s * its share of them, and DeepSpeed's 1/accumulation and 1/dp
        averaging is undone, so the gradient and the logged loss are the same in every layout
        (DP x accumulation) with the same global batch."""
        t, eng, lay = self.cfg.train, self.engine, self.layout
        step = self.state.step + 1
        t0 = time.time()
        # the base rate this step uses (the scheduler moves after an applied step); group 0 may be scaled
        lr = eng.get_lr()[0] / eng.optimizer.param_groups[0].get("lr_scale", 1.0)
        batches = self.feed.step_batches(t.grad_accum_steps)
        n = len(self.sources)
        index = {src.name: i for i, src in enumerate(self.sources)}
        counts = [labelled_tokens(b["labels"]) for _, b in batches]
        totals = torch.zeros(n + 1, dtype=torch.float64, device=self.device)  # tokens per source, data error
        for (src, _), c in zip(batches, counts):
            totals[index[src.name]] += c
        totals[n] = 1.0 if self.feed.error else 0.0
        if self.dp_group is not None and lay.dp_size > 1:
            dist.all_reduce(totals, group=self.dp_group)
        self._check_data_error(totals[n].item())
        gas = t.grad_accum_steps * n  # DeepSpeed's accumulation: one micro-step per source micro-batch
        # per source: loss*tokens, tokens, images, documents; then one non-finite flag
        sums = torch.zeros(4 * n + 1, dtype=torch.float64, device=self.device)  # on device: nccl needs it
        for (src, batch), tokens in zip(batches, counts):
            i = index[src.name]
            loss, stats = self._forward(batch)
            # One collective per micro-batch: is the loss finite on every rank?
            bad_flag = (~torch.isfinite(loss.detach())).float().reshape(1)
            dist.all_reduce(bad_flag)
            bad = bad_flag.item() > 0
            eng.backward(loss * (src.weight * tokens * lay.dp_size * gas / max(1.0, totals[i].item())))
            eng.step()
            sums[4 * i: 4 * i + 4] += torch.tensor(
                [0.0 if bad else loss.item() * tokens, float(tokens), batch["num_images"].sum().item(),
                 batch["num_documents"].sum().item()], dtype=torch.float64, device=self.device)
            sums[4 * n] += float(bad)
        applied = eng.was_step_applied()
        non_finite_loss = sums[4 * n].item() > 0
        if non_finite_loss and applied:
            raise RuntimeError("internal: DeepSpeed applied an optimizer step whose loss was not finite")
        if self.dp_group is not None and lay.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        per = sums[: 4 * n].view(n, 4)
        elapsed = time.time() - t0
        self.state.step = step
        if applied:
            self.state.consecutive_skipped = 0
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_skipped += 1
            self.log(f"step {step}: non-finite {'loss' if non_finite_loss else 'gradient norm'} on some rank; "
                     f"step skipped on all ranks ({self.state.skipped_steps} so far)")
        self.state.tokens_seen += int(per[:, 1].sum().item())
        grad_norm = eng.get_global_grad_norm()
        source_loss = per[:, 0] / per[:, 1].clamp(min=1.0)
        weights = torch.tensor([src.weight for src in self.sources], dtype=torch.float64, device=self.device)
        metrics = {
            "loss": (weights * source_loss).sum().item() if not non_finite_loss else float("nan"),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None and applied else float("nan"),
            "tokens_per_s": per[:, 1].sum().item() / elapsed,
            "images_per_s": per[:, 2].sum().item() / elapsed,
            "step_time_s": elapsed,
            "skipped_steps": float(self.state.skipped_steps),
            "step_applied": float(applied),
        }
        if n > 1 or self.sources[0].name != "main":
            for i, src in enumerate(self.sources):
                metrics[f"loss/{src.name}"] = source_loss[i].item() if not non_finite_loss else float("nan")
                metrics[f"tokens_per_s/{src.name}"] = per[i, 1].item() / elapsed
                metrics[f"images_per_s/{src.name}"] = per[i, 2].item() / elapsed
                metrics[f"documents_per_s/{src.name}"] = per[i, 3].item() / elapsed
        return metrics

    def gate_values(self) -> dict[str, float]:
        """tanh(alpha) of every gate (mean over channels for per-channel gates)."""
        out = {}
        for i, block in self.model.xattn_blocks():
            for name in ("alpha_cross_attn", "alpha_dense"):
                p = getattr(block, name)
                value = full_param(p)
                out[f"gate/{name.removeprefix('alpha_')}/layer{i}"] = torch.tanh(value.float()).mean().item()
        return out

    def close(self, status: str = "FINISHED") -> None:
        if self.tracker is not None:
            self.tracker.close(status)


def full_param(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value, also under ZeRO-3 (where each rank holds a partition)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p.detach()
