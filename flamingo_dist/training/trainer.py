"""A small trainer with named phases: build, train, train_step, close.

A step reads the device once (training/step.py): after the last backward, one all-reduced
vector carries the gradient norm, the non-finite losses, the stop signal, a due timed checkpoint,
a data error and the loss sums; every rank decides from the same numbers. A step with a
non-finite loss or gradient norm is discarded on every rank through DeepSpeed's own overflow path
(gradients dropped, optimizer and schedule untouched) and counted; too many in a row stop the
run with a message. Statistics that are not decisions (gate values, data counters) are read on
logged steps only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from flamingo_dist.config.schema import JobConfig
from flamingo_dist.data.layout import labelled_tokens
from flamingo_dist.data.processing import MODEL_KEYS, normalize_pixels
from flamingo_dist.training.rollback import SpikeDetector, roll_back
from flamingo_dist.training.state import TrainingStopped, TrainState
from flamingo_dist.training.step import StepRead, account, read_step, step_metrics

log = logging.getLogger(__name__)


def _dtype(cfg: JobConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


class Trainer:
    def __init__(self, cfg: JobConfig, ds_config_path: str | dict, layout):
        self.cfg, self.layout = cfg, layout
        self.state = TrainState()
        self.ds_config_path = ds_config_path
        self.tracker = None
        self.run_lock = None  # rank 0: the run directory's lock (training/run_lock.py), held until close()
        self.watchdog = None  # training/watchdog.py: started by train() unless train.hang_timeout_s is 0
        self.collectives = None  # training/watchdog.py CollectiveLog: the last collective, time inside them
        self.run_id: str | None = None  # the MLflow run, kept across resumes
        self.saved_data: dict | None = None  # the data position of the checkpoint resumed from
        self.feed = None  # flamingo_dist.data.feed.DataFeed: batches of every source
        self._val_batches: dict | None = None  # validation micro-batches per source, drawn once
        self.stop_flag = None  # a flamingo_dist.distributed.slurm.StopFlag: stop (saving) at the next step boundary
        self.stopped = False  # training ended early on a stop signal, after a committed checkpoint
        self._eval_tasks: dict | None = None  # the evaluation sets, read at the first evaluation
        self.fused_step = None  # training.zero_step.FusedZeroStep: our ZeRO step, when it applies
        self.last_read: StepRead | None = None  # what the last step's one read returned
        self._last_save = (0, time.time())  # (step, time) of the last checkpoint, or of the start
        self.spikes = SpikeDetector(cfg.train)  # train.spike_rollback: is a rollback due? (training/rollback.py)
        self._steps_run = 0  # optimizer steps run by this process, rolled-back ones included
        self._rollback_at: list[int] = []  # _steps_run of each rollback (the loop limit)

    # ---------------------------------------------------------------- build
    def build(self, track: bool = True, feed=None) -> "Trainer":
        """Everything a run needs. `feed`: micro-batches from elsewhere than the configured data
        (an object with `sources`, `error` and `step_batches`, as benchmarks use): no validation."""
        from flamingo_dist.config.deepspeed import resolve_ds_config
        from flamingo_dist.data.feed import DataFeed
        from flamingo_dist.distributed.groups import MegatronMPU, dp_group, tp_group
        from flamingo_dist.eval.attributes import attribute_ids
        from flamingo_dist.hf.llama import load_tokenizer
        from flamingo_dist.training.build import build_model, resolve_model_config
        from flamingo_dist.training.engine import parallelize

        cfg, lay = self.cfg, self.layout
        if cfg.train.hang_timeout_s > 0:  # before DeepSpeed keeps references to torch's collectives
            from flamingo_dist.training.watchdog import install_collective_log

            self.collectives = install_collective_log()
        self._lock_run_dir()
        self.synthetic_backbones = cfg.model.synthetic_backbones  # resolving points the LM and ViT into it
        self._on_writers(self._build_backbones)
        for note in resolve_model_config(cfg.model):
            self.log(note)
        ds_config = self.ds_config = resolve_ds_config(self.ds_config_path, cfg, lay.dp_size)
        resume_from = self._pick_resume(cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        self._report_partial_checkpoints()
        if feed is None:
            self.sources, self.val_shards, tok_dir = self._data_sources()
            self.tokenizer = load_tokenizer(tok_dir, cfg.model.lm.vocab_size)
            self.attribute_ids = attribute_ids(cfg, self.tokenizer)
        else:
            self.sources, self.val_shards, self.tokenizer, self.attribute_ids = feed.sources, {}, None, {}
        self.model = build_model(cfg.model, tp_group(), cfg.train.seed, _dtype(cfg))
        if self.model.vision.image_size != cfg.data.image_size:
            raise ValueError(f"data.image_size ({cfg.data.image_size}) must equal the vision encoder's "
                             f"input size ({self.model.vision.image_size})")
        self.engine = parallelize(self.model, cfg, ds_config, MegatronMPU(), lay.device)
        self.device = self.engine.device
        from flamingo_dist.training import zero_step

        if cfg.train.fused_zero_step:
            self.fused_step = zero_step.install(self.engine)
        if cfg.eval.every_steps and self.engine.zero_optimization_partition_weights() and lay.dp_size > 1:
            from flamingo_dist.config.schema import ConfigError

            raise ConfigError("eval.every_steps: evaluation during training does not run under ZeRO-3 with data "
                              "parallelism (ranks evaluate different queries, so their forward passes over the "
                              "partitioned weights would not line up); use ZeRO-1/2, or evaluate checkpoints "
                              "with tools/evaluate.py")
        self.dp_group = dp_group()
        if cfg.checkpoint.resume:
            self._resume(resume_from)
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

        self.feed = feed or DataFeed(cfg, self.sources, self.tokenizer, lay.dp_rank, lay.dp_size, self.dp_group,
                                     self.device, self.saved_data, worker_init_fn=ignore_stop_signals)
        if feed is None:
            described = [f"{s.name} ({s.format}, {len(s.shards)} shards, weight {s.weight:g}, micro-batch "
                         f"{s.micro_batch_size})" for s in self.sources]
            self.log(f"data: {', '.join(described)}; {self.feed.num_streams} streams per source, "
                     f"from slot {self.feed.start}")
        if track:
            from flamingo_dist.training.tracking import Tracker

            self.tracker = Tracker(cfg.tracking, cfg, lay, run_name=cfg.flavor, run_id=self.run_id)
            self.run_id = self.tracker.run_id
        return self

    def _lock_run_dir(self) -> None:
        """Collective: rank 0 takes the run directory (training/run_lock.py); every rank raises the
        same one-line error when another live run holds it."""
        from flamingo_dist.config.schema import ConfigError
        from flamingo_dist.training.run_lock import RunDirectoryBusy, RunLock

        box: list = [None]
        if self.layout.rank == 0:
            try:
                self.run_lock = RunLock(self.cfg.tracking.run_dir).acquire()
            except RunDirectoryBusy as e:
                box[0] = str(e)
            else:
                self._set_aside_hang_reports()
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise ConfigError(box[0])

    def _report_partial_checkpoints(self) -> None:
        """Rank 0: name the step folders a cut-short save left (never resumed from; `prune` removes
        them once a newer checkpoint commits)."""
        from flamingo_dist.config.schema import checkpoint_dir
        from flamingo_dist.training import checkpoint

        root = checkpoint_dir(self.cfg)
        left = checkpoint.partial(root) if self.layout.rank == 0 else []
        if left:
            sizes = ", ".join(f"{os.path.basename(p)} ({checkpoint.dir_bytes(p) / 1e6:.1f} MB)" for p in left)
            self.log(f"warning: {len(left)} partial checkpoint folder(s) in {root}, without a commit marker (a save "
                     f"cut short; never resumed from, removed once a newer checkpoint commits): {sizes}")

    def _set_aside_hang_reports(self) -> None:
        """Rank 0, holding the run directory: an earlier hang's reports go to hang-<time>/ (kept
        for reading; a new hang writes a fresh hang/)."""
        from flamingo_dist.training.watchdog import HANG_DIR

        old = os.path.join(self.cfg.tracking.run_dir, HANG_DIR)
        if os.path.isdir(old):
            aside = f"{old}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(os.path.getmtime(old)))}"
            os.rename(old, aside if not os.path.exists(aside) else f"{aside}-{os.getpid()}")
            self.log(f"the reports of an earlier hang are in {aside} (python tools/hang_report.py {aside})")

    def start_watchdog(self) -> None:
        """The hang watchdog's thread (training/watchdog.py), unless train.hang_timeout_s is 0."""
        if self.cfg.train.hang_timeout_s > 0 and self.watchdog is None:
            from flamingo_dist.training.watchdog import Watchdog

            self.watchdog = Watchdog(self.cfg.tracking.run_dir, self.layout.rank, self.layout.world_size).start()

    @contextlib.contextmanager
    def _watched(self, name: str):
        """A validation or evaluation under its own limit; then the step's limit again."""
        self.phase(name, self.cfg.train.hang_timeout_save_s)
        try:
            yield
        finally:
            self.phase(f"step (after {name})", self.cfg.train.hang_timeout_s)

    def phase(self, name: str, limit_s: float) -> None:
        """Tell the hang watchdog where this rank is (no-op without one)."""
        if self.watchdog is not None:  # a step is reported by the number it will have once done
            self.watchdog.phase(name, self.state.step + (name == "step"), limit_s)

    def _pick_resume(self, spec: str) -> str | None:
        """The checkpoint to resume (collective: verified), checked against this run's config
        before anything is built: a change of the model's shapes is one error naming the fields."""
        from flamingo_dist.config.schema import checkpoint_dir
        from flamingo_dist.training import checkpoint
        from flamingo_dist.training.resume_config import check_resume_config

        path = checkpoint.resolve_resume(spec, checkpoint_dir(self.cfg))
        if path is not None:
            check_resume_config(path, self.cfg)
        return path

    def _resume(self, path: str | None) -> None:
        from flamingo_dist.config.schema import checkpoint_dir
        from flamingo_dist.training import checkpoint

        if path is None:
            self.log(f"resume auto: no committed checkpoint in {checkpoint_dir(self.cfg)}; starting fresh")
            return
        checkpoint.load(self, path)
        self.log(f"resumed from {path} at step {self.state.step}")

    # ---------------------------------------------------------------- checkpoint contract
    def state_dict(self) -> dict:
        """Collective: what a checkpoint keeps of the trainer besides the engine and the RNG (JSON):
        the counters, the MLflow run, every stream's data position."""
        run_id = self.tracker.run_id if self.tracker is not None else self.run_id  # rank 0's, once MLflow answered
        return {**dataclasses.asdict(self.state), "run_id": run_id, "data": self.feed.state_dict()}

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
        with self._watched("save"):
            path = checkpoint.save(self, root)
        self._last_save = (self.state.step, time.time())
        self.log(f"checkpoint committed: {path}")
        checkpoint.prune(root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every, self.layout.rank)
        return path

    def _save_due(self) -> bool:
        """Every N steps, or every M minutes as rank 0's clock said in the step's read."""
        ck, step = self.cfg.checkpoint, self.state.step
        if ck.every_steps and step % ck.every_steps == 0:
            return True
        return bool(ck.every_minutes and self.last_read is not None and self.last_read.save_due)

    def _timed_save_due_here(self) -> bool:
        """Rank 0: are checkpoint.every_minutes up since the last save? (Other ranks: no.)"""
        every = self.cfg.checkpoint.every_minutes
        return bool(every and self.layout.rank == 0 and time.time() - self._last_save[1] >= 60 * every)

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
                suite.update(eval_tasks.select_synthetic(eval_tasks.synthetic_suite(where), ev.synthetic_tasks))
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
            with self._outside_params_gathered():
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

    def _to_device(self, batch: dict) -> dict:
        """The keys the model uses, copied to the device without blocking the host (the loader
        pins its batches in page-locked memory when training on a GPU)."""
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_KEYS if k in batch}

    def _outside_params_gathered(self):
        """Context for forwards that do not go through the engine (validation's logits, few-shot
        evaluation): under ZeRO-3 the parameters read outside their own module (the decoupled
        head's rows, the resampler's time embeddings) are gathered for its whole length, as the
        engine's forward does through their registration (training/engine.py); nothing otherwise.
        No engine forward may run inside: its end releases them."""
        return gathered(self.model.parameters_used_outside_their_module())

    def _logits(self, batch: dict) -> torch.Tensor:
        """Full-vocabulary logits of one micro-batch (gathered over TP)."""
        b = self._to_device(batch)
        with self._outside_params_gathered():
            return self.model.logits(b["input_ids"], normalize_pixels(b["pixel_values"]), b["image_attention_mask"],
                                     position_ids_BT=b["position_ids"], document_ids_BT=b.get("document_ids"),
                                     media_slots_M=b.get("media_slots"))

    def _stop_requested(self) -> bool:
        """Did a stop signal reach any rank by the last step's read? (No collective of its own.)"""
        return self.stop_flag is not None and self.last_read is not None and self.last_read.stop

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
        from flamingo_dist.config.load import source_configs
        from flamingo_dist.data.feed import resolve_sources
        from flamingo_dist.data.synthetic import ensure_corpus

        d = self.cfg.data
        generated = [sc for sc in source_configs(self.cfg) if sc.synthetic] if d.sources else []
        if d.sources and not generated or d.shards is not None:
            tok_dir = d.tokenizer or self.cfg.model.lm.path or self.cfg.model.init_from
            if tok_dir is None:
                raise ValueError("data.tokenizer: needed when data shards are given and no checkpoint is")
            return (*resolve_sources(self.cfg), tok_dir)
        if (self.cfg.model.lm.path or self.cfg.model.init_from) and not self.synthetic_backbones:
            raise ValueError("data.shards: the synthetic corpus is only for random LMs and the synthetic backbones; "
                             "with a checkpoint give data.shards (its word tokenizer cannot stand in for the "
                             "checkpoint's)")
        vocab = self.cfg.model.lm.vocab_size
        # (name, kind, training folder, held-out folder): the corpus of synthetic_dir, or one folder
        # per data.sources entry naming a synthetic corpus
        corpora = [(sc.name, sc.synthetic, os.path.join(d.synthetic_dir, sc.name)) for sc in generated] or \
            [("main", "attributes", d.synthetic_dir)]
        corpora = [(n, k, p, os.path.join(p, "val") if d.val_every_steps else None) for n, k, p in corpora]

        def write():
            for _, kind, train_dir, val_dir in corpora:
                ensure_corpus(train_dir, d.synthetic_num_docs, seed=0, side=d.image_size, vocab_size=vocab,
                              max_images=d.max_images, kind=kind)
                if val_dir:
                    ensure_corpus(val_dir, d.synthetic_val_docs, seed=1, side=d.image_size, vocab_size=vocab,
                                  docs_per_shard=16, max_images=d.max_images, kind=kind)

        self._on_writers(write)
        tok_dir = d.tokenizer or self.cfg.model.lm.path or os.path.join(corpora[0][2], "tokenizer")
        if generated:
            return (*resolve_sources(self.cfg, synthetic_sources={n: (p, v) for n, _, p, v in corpora}), tok_dir)
        return (*resolve_sources(self.cfg, d.synthetic_dir, corpora[0][3]), tok_dir)

    def log(self, msg: str) -> None:
        """The trainer's messages (the module logger; printed on rank 0 by flamingo_dist.setup_logging)."""
        log.info(msg)

    # ---------------------------------------------------------------- train
    def train(self) -> TrainState:
        from flamingo_dist.training.tracking import Progress

        t = self.cfg.train
        progress = Progress(t.steps, self.layout.rank, t.log_every)
        self._last_save = (self.state.step, time.time())
        if self.stop_flag is not None:
            self.stop_flag.arm(t.stop_grace_s)  # from here a stop signal saves before the process ends
        self.start_watchdog()
        first = True
        try:
            if self.cfg.eval.at_start and self.state.step == 0:
                self._validate_and_log()
                if self.cfg.eval.every_steps:
                    with self._watched("evaluation"):
                        self.evaluate()
            while self.state.step < t.steps:
                self.phase("step", t.hang_timeout_first_step_s if first else t.hang_timeout_s)
                first = False
                metrics = self.train_step()
                progress.update(self.state.step, metrics)
                if self.cfg.data.val_every_steps and self.state.step % self.cfg.data.val_every_steps == 0:
                    self._validate_and_log()
                if t.spike_rollback:
                    metrics["rollbacks"] = float(self.state.rollbacks)
                if self.state.step % t.log_every == 0:  # reads of the device on logged steps only
                    metrics.update(self.gate_values())  # a collective under ZeRO-3: same steps on all ranks
                    metrics.update(self.feed.counters())
                    self._write_metrics(metrics)
                    if self.tracker is not None:
                        self.tracker.log_metrics(metrics, self.state.step)
                spike = self.spikes.observe(self.state, metrics["loss"]) if t.spike_rollback else None
                if spike is not None:
                    roll_back(self, *spike)
                    continue
                if self.state.consecutive_skipped >= t.max_consecutive_skipped_steps:
                    raise TrainingStopped(
                        f"{self.state.consecutive_skipped} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm (train.max_consecutive_skipped_steps = {t.max_consecutive_skipped_steps}); "
                        "stopping. Lower train.lr, check the data, or try train.precision: fp32 to debug.")
                ev = self.cfg.eval
                if ev.every_steps and self.state.step % ev.every_steps == 0:
                    with self._watched("evaluation"):
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
            self.phase("done", 0)
            if self.stop_flag is not None:
                self.stop_flag.disarm()  # finished, stopped after its save, or failed: a signal now just ends it
        return self.state

    def _validate_and_log(self) -> None:
        if self.cfg.data.val_every_steps:
            with self._watched("validation"):
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
        b = self._to_device(batch)
        pixels = normalize_pixels(b["pixel_values"])  # the loader ships uint8: normalised here, on the device
        return self.engine(b["input_ids"], pixels, b["image_attention_mask"], position_ids_BT=b["position_ids"],
                           labels_BT=b["labels"], z_loss=self.cfg.train.z_loss, document_ids_BT=b.get("document_ids"),
                           loss_chunk_tokens=self.cfg.train.loss_chunk_tokens, media_slots_M=b.get("media_slots"))

    def _check_data_error(self) -> None:
        """Collective, when the step's read reported a data error on some rank (a shard over the
        skip-rate limit): every rank stops with the first rank's message."""
        messages: list = [None] * dist.get_world_size()
        dist.all_gather_object(messages, self.feed.error)
        raise TrainingStopped(next(m for m in messages if m))

    def train_step(self) -> dict:
        """One optimizer step: grad_accum_steps micro-batches of every source (training/step.py
        for each piece). Reads the device once, after the last backward."""
        t0 = time.perf_counter()
        self._steps_run += 1
        inside0 = self.collectives.seconds_inside if self.collectives is not None else 0.0
        index = {src.name: i for i, src in enumerate(self.sources)}
        drawn = self.feed.step_batches(self.cfg.train.grad_accum_steps)
        batches = account([(index[src.name], b) for src, b in drawn], len(self.sources),
                          [src.weight for src in self.sources], self.layout.dp_size, self.dp_group, self.device)
        losses = self._forward_backward(batches)
        read = self.last_read = self._read(batches, losses, self._own_seconds(t0, inside0))
        applied, grad_norm = self._apply(read)
        self._count(read, applied)
        return step_metrics(read, [src.weight for src in self.sources], [src.name for src in self.sources],
                            self._lr_of_step, grad_norm, applied, self.state.skipped_steps,
                            time.perf_counter() - t0)

    def _forward_backward(self, batches) -> list[torch.Tensor]:
        """Forward and backward of every micro-batch, each loss weighted (`account`); the
        optimizer's engine.step() of the last one waits for the read (`_apply`)."""
        eng = self.engine
        # the base rate this step uses (the scheduler moves after an applied step); group 0 may be scaled
        self._lr_of_step = eng.get_lr()[0] / eng.optimizer.param_groups[0].get("lr_scale", 1.0)
        losses = []
        for j, batch in enumerate(batches.items):
            loss, _ = self._forward(batch)
            eng.backward(loss * batches.loss_scales[j])
            if j < len(batches.items) - 1:
                eng.step()  # a micro-step: DeepSpeed counts it, nothing is updated
            losses.append(loss.detach())
        return losses

    def _own_seconds(self, t0: float, inside0: float) -> tuple[int, float] | None:
        """(rank, host seconds of this step so far outside collectives): a straggler's is the
        largest (the others wait for it inside collectives). None without the collective log."""
        if self.collectives is None or self.layout.world_size == 1:
            return None
        inside = self.collectives.seconds_inside - inside0
        return self.layout.rank, max(0.0, time.perf_counter() - t0 - inside)

    def _read(self, batches, losses, own_seconds=None) -> StepRead:
        """The one per-step read (training/step.py `read_step`)."""
        lay = self.layout
        norm_sq = self.fused_step.grad_norm_sq(self.device) if self.fused_step is not None else None
        flags = (self.stop_flag is not None and self.stop_flag.raised, self._timed_save_due_here(),
                 self.feed.error is not None)
        return read_step(batches, losses, norm_sq, len(self.sources), flags, lay.tp_size, lay.world_size, self.device,
                         own_seconds=own_seconds)

    def _apply(self, read: StepRead) -> tuple[bool, float]:
        """The optimizer step as the read decided: (applied, gradient norm)."""
        if read.data_error:
            self._check_data_error()
        eng = self.engine
        if self.fused_step is not None:
            self.fused_step.decide(read.skip, read.grad_norm)
            eng.step()
            return not read.skip, read.grad_norm
        eng.step()  # DeepSpeed's own step decides (and reads) the gradient norm
        applied = eng.was_step_applied()
        if read.non_finite_losses and applied:
            raise RuntimeError("internal: DeepSpeed applied an optimizer step whose loss was not finite")
        norm = eng.get_global_grad_norm()
        return applied, float(norm) if norm is not None else float("nan")

    def _count(self, read: StepRead, applied: bool) -> None:
        """The trainer's counters after the step."""
        st = self.state
        st.step += 1
        st.tokens_seen += int(sum(read.tokens))
        if applied:
            st.consecutive_skipped = 0
            return
        st.skipped_steps += 1
        st.consecutive_skipped += 1
        self.log(f"step {st.step}: non-finite {'loss' if read.non_finite_losses else 'gradient norm'} on some rank; "
                 f"step skipped on all ranks ({st.skipped_steps} so far)")

    def gate_values(self) -> dict[str, float]:
        """tanh(alpha) of every gate (mean over channels for per-channel gates): one gather under
        ZeRO-3, one read."""
        names, params = [], []
        for i, block in self.model.xattn_blocks():
            for name in ("alpha_cross_attn", "alpha_dense"):
                names.append(f"gate/{name.removeprefix('alpha_')}/layer{i}")
                params.append(getattr(block, name))
        if not params:
            return {}
        with gathered(params):
            values = torch.stack([torch.tanh(p.detach().float()).mean() for p in params]).tolist()
        return dict(zip(names, values))

    def close(self, status: str = "FINISHED") -> None:
        if self.tracker is not None:
            self.tracker.close(status)
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if getattr(self.feed, "close", None) is not None:  # a benchmark's feed may have no workers to close
            self.feed.close()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None


def gathered(params: list):
    """Context: the full values of `params` inside, also under ZeRO-3 (one gather for all)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def full_param(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value, also under ZeRO-3 (where each rank holds a partition)."""
    with gathered([p]):
        return p.detach().clone() if hasattr(p, "ds_id") else p.detach()
