"""Committed checkpoints and exact resume.

Layout of one checkpoint, `<dir>/step_<N>/`:
  ds/                   DeepSpeed engine state (trainable weights, fp32 masters, optimizer,
                        LR schedule), frozen parameters excluded
  rank<r>.pt            per-rank RNG states and data position
  trainer.json          step counters, MLflow run id, layout (rank 0)
  config.json           resolved job config and DeepSpeed config (rank 0)
  base_model.json       what the frozen weights are: SHA-256 of the base checkpoint files (cached
                        beside them, so a 70B model is hashed once), or the seed of a random LM
  COMMITTED.json        written last, by rank 0, temp file + rename, after a barrier: the step
                        and a SHA-256 of every other file. Only committed checkpoints count.

Every rank writes its part; the files are hashed by all ranks in parallel (a strided split),
gathered, and committed by rank 0. A crash before the commit leaves the previous checkpoint as
the newest. Loading verifies the hashes first: a damaged file is named; `--resume auto` then
falls back to the previous committed checkpoint and says so.

Frozen weights are not saved: the base model is rebuilt from its path (or seed).

Resharding. A checkpoint resumes at another data-parallel size (ZeRO 1/2/3) or TP size through
DeepSpeed's universal checkpoint: on the first such resume rank 0 converts `ds/` once with
DeepSpeed's own `ds_to_universal` into `universal/` beside it (one fp32 tensor, exp_avg and
exp_avg_sq per parameter, TP shards merged by the patterns every save records in
`universal_checkpoint_info`: row-parallel weights along dim 1, column-parallel along dim 0,
the rest replicated), and every rank loads its new slice from it. The frozen LM simply reloads
at the new TP size. The data position (micro-batch slots consumed and every data stream's state,
see data/pipeline.py) means the same thing in every layout where data-parallel size x loader
workers divides the stream count; other layouts are refused. RNG states come from rank 0's file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from flamingo_dist.config.schema import CHECKPOINT_COMMIT, step_folders
from flamingo_dist.config.schema import committed_checkpoints as committed  # noqa: F401 (checkpoint.committed)

COMMIT = CHECKPOINT_COMMIT
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or the mismatch."""


@contextlib.contextmanager
def _safely():
    """Every torch.load inside, DeepSpeed's included, loads data only (training/safe_load.py); a
    file that needs more is a CheckpointError naming it."""
    from flamingo_dist.training.safe_load import UnsafeCheckpointError, safe_loading

    try:
        with safe_loading():
            yield
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(path: str) -> list[str]:
    out = []
    for base, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(base, n), path)
            if rel != COMMIT and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _hash_in_parallel(path: str, rels: list[str]) -> dict[str, str]:
    """Each rank hashes every world_size-th file; all ranks get the whole table."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {rel: _sha256(os.path.join(path, rel)) for rel in rels[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    table: dict[str, str] = {}
    for part in parts:
        table.update(part)
    return table


def rng_state() -> dict:
    """Every generator's state as tensors, numbers and strings only (loadable with
    weights_only=True: nothing to unpickle but data)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n, py = state["numpy"], state["python"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    else:  # checkpoints written before 2026-12-05: numpy's own tuple, Python's own tuple
        np.random.set_state(n)
        random.setstate(py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _hash_dir_cached(path: str) -> dict[str, str]:
    """SHA-256 of every file under a base-model directory, cached in a JSON file beside it (or in
    ~/.cache/flamingo_dist when that directory is read-only) and recomputed only for files whose
    size or mtime changed."""
    path = os.path.abspath(path)
    cache_name = ".flamingo_dist_sha256.json"
    candidates = [os.path.join(path, cache_name) if os.path.isdir(path) else path + cache_name,
                  os.path.join(os.path.expanduser("~/.cache/flamingo_dist"),
                               hashlib.sha256(path.encode()).hexdigest()[:16] + ".json")]
    cache: dict = {}
    for c in candidates:
        if os.path.isfile(c):
            with open(c) as f:
                cache = json.load(f)
            break
    files = [path] if os.path.isfile(path) else [
        os.path.join(b, n) for b, _, ns in os.walk(path) for n in ns if n != cache_name]
    out, changed = {}, False
    for full in sorted(files):
        rel = os.path.relpath(full, path) if os.path.isdir(path) else os.path.basename(full)
        st = os.stat(full)
        entry = cache.get(rel)
        if not entry or entry["size"] != st.st_size or entry["mtime_ns"] != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(full)}
            cache[rel], changed = entry, True
        out[rel] = entry["sha256"]
    if changed:
        for c in candidates:
            try:
                os.makedirs(os.path.dirname(c), exist_ok=True)
                with open(c + ".tmp", "w") as f:
                    json.dump(cache, f)
                os.replace(c + ".tmp", c)
                break
            except OSError:
                continue
    return out


def base_manifest(cfg) -> dict:
    """What the frozen weights are, so a resume against different ones is refused."""
    m = cfg.model
    out: dict = {"vision_model": m.vision.model_name}
    if m.init_from or m.lm.path:
        src = m.init_from or m.lm.path
        out["base"] = {"path": os.path.abspath(src), "files": _hash_dir_cached(src)}
    else:
        out["base"] = {"random_seed": cfg.train.seed, "lm": dataclasses.asdict(m.lm)}
    if m.vision.pretrained:
        out["vision_weights"] = {"path": os.path.abspath(m.vision.pretrained),
                                 "files": _hash_dir_cached(m.vision.pretrained)}
    return out


def _manifest_mismatch(saved: dict, now: dict) -> list[str]:
    problems = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and "files" in a and "files" in b:
            changed = sorted(f for f in set(a["files"]) | set(b["files"]) if a["files"].get(f) != b["files"].get(f))
            if changed:
                problems.append(f"{key} at {b['path']}: files differ from the checkpoint's ({changed[:5]})")
        elif a != b:
            problems.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
    return problems


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def partial(root: str) -> list[str]:
    """Step folders without a commit marker (a save that was cut short), oldest first: never
    resumed from; listed at start, removed once a newer checkpoint commits (`prune`)."""
    return [d for d in step_folders(root) if not os.path.isfile(os.path.join(d, COMMIT))]


@functools.lru_cache(maxsize=4)
def _committed_bytes(path: str, committed_at: float) -> int:
    """dir_bytes of a committed checkpoint (not written again once committed: walked once, not
    before every save; `committed_at`, its marker's time, tells a replaced one apart)."""
    return dir_bytes(path)


def _space_problem(root: str, path: str) -> str | None:
    """Rank 0, before a save: why the disk cannot take another checkpoint as large as the last
    committed one (5% margin), or None."""
    last = committed(root)[-1:]
    need = _committed_bytes(last[0], os.path.getmtime(os.path.join(last[0], COMMIT))) if last else 0
    free = shutil.disk_usage(root).free
    if need and free < need * 1.05:
        return (f"no space for checkpoint {path}: {free} bytes free on {root}, the last checkpoint took {need} "
                f"bytes; free some space or set checkpoint.dir elsewhere, then --resume auto (the last "
                f"checkpoint, {last[0]}, is intact)")
    return None


def _out_of_space(e: BaseException, path: str) -> bool:
    """Did this write fail for a full disk? torch.save reports it as a RuntimeError without
    errno ("file write failed", "basic_ios::clear: iostream error"): judged by what is left."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return "No space left" in str(e) or shutil.disk_usage(path).free < 64 * 2**20
    except OSError:
        return False


def save(trainer, root: str) -> str:
    """Collective: write and commit the checkpoint of trainer's current step. A disk that cannot
    take it is one CheckpointError (checked before writing against the last checkpoint's size,
    and when a write fails for lack of space); the earlier checkpoints are untouched."""
    lay, step = trainer.layout, trainer.state.step
    path = step_dir(root, step)
    box: list = [None]
    if lay.rank == 0:
        if os.path.isfile(os.path.join(path, COMMIT)):  # e.g. after resuming an older one explicitly
            os.rename(path, f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")  # never delete committed work
        elif os.path.isdir(path):  # an uncommitted leftover of a crash at this step
            shutil.rmtree(path)
        os.makedirs(root, exist_ok=True)
        box[0] = _space_problem(root, path)
        if box[0] is None:
            os.makedirs(path)
    dist.broadcast_object_list(box, src=0)  # also the barrier: the folder exists
    if box[0]:
        raise CheckpointError(box[0])
    try:
        _write(trainer, path, step)
    except (OSError, RuntimeError) as e:
        if not _out_of_space(e, path):
            raise
        last = committed(root)[-1:]
        shutil.rmtree(path, ignore_errors=True)  # give the space back; it was never committed
        raise CheckpointError(
            f"no space left on the device writing checkpoint {path} ({shutil.disk_usage(root).free} bytes free"
            + (f"; the last checkpoint took {dir_bytes(last[0])} bytes" if last else "")
            + "): free some space or set checkpoint.dir elsewhere, then --resume auto"
            + (f" (the last checkpoint, {last[0]}, is intact)" if last else "")) from None
    return path


def _write(trainer, path: str, step: int) -> None:
    lay = trainer.layout
    trainer.engine.save_checkpoint(path, tag="ds", save_latest=False, exclude_frozen_parameters=True)
    torch.save({"rng": rng_state()}, os.path.join(path, f"rank{lay.rank}.pt"))
    own = trainer.state_dict()  # collective: every stream's data position, from its owner
    if lay.rank == 0:
        with open(os.path.join(path, "trainer.json"), "w") as f:
            json.dump({**own, "tp_size": lay.tp_size, "dp_size": lay.dp_size, "world_size": lay.world_size}, f,
                      indent=1)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"job": dataclasses.asdict(trainer.cfg), "deepspeed": trainer.ds_config}, f, indent=1)
        with open(os.path.join(path, "base_model.json"), "w") as f:
            json.dump(base_manifest(trainer.cfg), f, indent=1)
    dist.barrier()  # every part is on disk
    table = _hash_in_parallel(path, _files(path))
    if lay.rank == 0:
        tmp = os.path.join(path, COMMIT + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "files": table}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, COMMIT))
    dist.barrier()


def verify(path: str) -> None:
    """Collective: check every file against the commit's hashes; raise naming the first bad one."""
    marker = os.path.join(path, COMMIT)
    if not os.path.isfile(marker):
        raise CheckpointError(f"{path}: not a committed checkpoint ({COMMIT} missing)")
    try:
        with open(marker) as f:
            expected = json.load(f)["files"]
        if not isinstance(expected, dict):
            raise TypeError(f"'files' is a {type(expected).__name__}")
    except (ValueError, KeyError, TypeError) as e:  # empty, truncated or garbage: as if never committed
        raise CheckpointError(f"{marker}: unreadable commit marker ({type(e).__name__}: {e}); "
                              "the checkpoint counts as uncommitted") from None
    present = set(_files(path))
    missing = sorted(set(expected) - present)
    bad = [f"{os.path.join(path, m)} is missing" for m in missing]
    actual = _hash_in_parallel(path, sorted(set(expected) & present))
    bad += [f"{os.path.join(path, rel)}: SHA-256 mismatch (file damaged)" for rel in sorted(actual)
            if actual[rel] != expected[rel]]
    if bad:
        raise CheckpointError("; ".join(bad))


def resolve_resume(spec: str, root: str) -> str | None:
    """`auto`: the newest committed checkpoint that verifies (falling back, and saying so);
    a path: that checkpoint, verified. Collective. None when auto finds nothing."""
    if spec != "auto":
        verify(spec)
        return spec
    candidates = committed(root)
    for path in reversed(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning(f"resume: skipping damaged checkpoint ({e}); trying the previous one")
    return None


# The config fields that decide the trainable parameters' shapes (and so what a checkpoint can be
# loaded into); the cross-attention placement is compared as the layers it puts blocks before.
def universal_info(model) -> dict:
    """How each trainable tensor is laid out across TP ranks, in the form DeepSpeed's
    ds_to_universal reads (`model.universal_checkpoint_info`, saved in every checkpoint):
    megatron's row-parallel weights merge along dim 1, column-parallel ones along dim 0 (the
    default), everything else is replicated on every TP rank."""
    from deepspeed.checkpoint.constants import PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS

    row, replicated = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not getattr(p, "tensor_model_parallel", False):
            replicated.append(re.escape(name) + "$")
        elif getattr(p, "partition_dim", 0) == 1:
            row.append(re.escape(name) + "$")
    return {PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row, TP_REPLICATED_PARAMETER_PATTERNS: replicated}


def _to_universal(path: str, rank: int, out: str | None = None) -> str:
    """Collective: the universal form of checkpoint `path` (default `path/universal`), converted
    once by rank 0 with DeepSpeed's ds_to_universal (into a temp folder, renamed when complete);
    a failure is raised on every rank."""
    out = out or os.path.join(path, "universal")
    error = None
    if rank == 0 and not os.path.isdir(out):
        from deepspeed.checkpoint import ds_to_universal

        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=os.path.join(path, "ds"), output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        try:
            ds_to_universal.main(args)
            os.rename(tmp, out)
        except Exception as e:  # reported to every rank below, never swallowed
            import traceback

            traceback.print_exc()
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{path}: converting to a universal checkpoint failed: {type(e).__name__}: {e}"
        finally:
            pointer = os.path.join(os.path.dirname(out), "latest_universal")  # ds_to_universal's, unused here
            if os.path.isfile(pointer):
                os.remove(pointer)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])
    return out


def _load_engine(trainer, path: str, meta: dict) -> None:
    """The DeepSpeed engine state: directly at the saved layout, through the universal checkpoint
    at another one."""
    lay, engine = trainer.layout, trainer.engine
    kw = dict(load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True)
    if (meta["tp_size"], meta["dp_size"]) == (lay.tp_size, lay.dp_size):
        # Frozen parameters are not in the checkpoint: only they may be missing from the module state.
        engine.load_checkpoint(path, tag="ds", **kw)
        return
    log.info(f"resharding {path}: saved at TP {meta['tp_size']} x DP {meta['dp_size']}, "
        f"this run is TP {lay.tp_size} x DP {lay.dp_size}")
    with open(os.path.join(path, "config.json")) as f:
        saved_batch = json.load(f)["deepspeed"].get("train_batch_size")
    if saved_batch != trainer.ds_config.get("train_batch_size"):
        log.warning(f"warning: the global batch changes from {saved_batch} to {trainer.ds_config.get('train_batch_size')} "
            "documents per step (micro-batch x accumulation x data-parallel size); the run continues with it")
    _to_universal(path, lay.rank)
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads this flag at load time only
    try:
        engine.load_checkpoint(path, tag="universal", **kw)
    finally:
        engine._config.load_universal_checkpoint = False


def load(trainer, path: str) -> None:
    """Collective: restore engine, counters, RNG and data position from a verified checkpoint,
    resharding when the layout changed."""
    lay = trainer.layout
    with open(os.path.join(path, "trainer.json")) as f:
        meta = json.load(f)
    same_layout = (meta["tp_size"], meta["dp_size"]) == (lay.tp_size, lay.dp_size)
    if "data" not in meta:
        raise CheckpointError(f"{path}: written by an older flamingo_dist that kept no per-stream data position, "
                              "so it cannot be resumed exactly; export it (tools/export_idefics.py) instead")
    from flamingo_dist.data.feed import resolve_streams

    resolve_streams(trainer.cfg, lay.dp_size, meta["data"])  # a layout that cannot continue the data: refuse now
    problems = []
    if lay.rank == 0:  # hashing (cached) on one rank; everyone learns the verdict
        with open(os.path.join(path, "base_model.json")) as f:
            problems = _manifest_mismatch(json.load(f), base_manifest(trainer.cfg))
    box = [problems]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(f"{path}: the frozen base model differs from the one this checkpoint was trained on: "
                              + "; ".join(box[0]))
    with _safely():
        _load_engine(trainer, path, meta)
        own = torch.load(os.path.join(path, f"rank{lay.rank if same_layout else 0}.pt"), weights_only=True)
    set_rng_state(own["rng"])
    trainer.load_state_dict(meta)


def rollback(trainer, path: str) -> dict:
    """Collective, mid-run: restore the engine (weights, optimizer, scheduler) and RNG of the
    verified checkpoint `path` at this run's layout; the data feed is left where it is (what was
    read since is skipped). Returns the checkpoint's trainer.json (counters, data position)."""
    verify(path)
    with open(os.path.join(path, "trainer.json")) as f:
        meta = json.load(f)
    with _safely():
        _load_engine(trainer, path, meta)
        own = torch.load(os.path.join(path, f"rank{trainer.layout.rank}.pt"), weights_only=True)
    set_rng_state(own["rng"])
    return meta


def prune(root: str, keep_last: int, keep_every: int, rank: int) -> threading.Thread | None:
    """Delete committed checkpoints beyond the newest keep_last (except every keep_every-th step),
    and partial folders older than the newest commit, in a background thread on rank 0, so
    deleting never blocks training; failures are logged, never raised."""
    if rank != 0:
        return None
    done = committed(root)
    old = done[:-keep_last] if keep_last > 0 else []

    def step_of(path: str) -> int:
        return int(os.path.basename(path).split("_")[1])

    def keep(path: str) -> bool:
        return keep_every > 0 and step_of(path) % keep_every == 0

    doomed = [p for p in old if not keep(p)]
    doomed += [p for p in partial(root) if done and step_of(p) < step_of(done[-1])]
    if not doomed:
        return None

    def work() -> None:
        for p in doomed:
            try:
                if os.path.isfile(os.path.join(p, COMMIT)):
                    os.remove(os.path.join(p, COMMIT))  # uncommit first: a half-deleted one never counts
                shutil.rmtree(p)
            except OSError as e:
                print(f"[flamingo_dist] could not delete old checkpoint {p}: {e}", flush=True)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def model_from_checkpoint(path: str, dtype: torch.dtype = torch.float32):
    """(model, job config) of a committed checkpoint at any layout, in one process (TP=1):
    frozen weights rebuilt from the base model (path or seed), trainable weights consolidated
    from the ZeRO partitions (and TP shards) by DeepSpeed's own tools: zero_to_fp32 for a TP=1
    checkpoint, the universal checkpoint otherwise (`path/universal` when a resume already made
    it, else a temporary one, so a read-only checkpoint works). Needs an initialised process
    group (a world of one will do)."""
    import tempfile

    from deepspeed.checkpoint.constants import PARAM
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from flamingo_dist.config.load import config_from_dict
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.training.build import build_model, resolve_model_config

    verify(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_dict(json.load(f)["job"])
    with open(os.path.join(path, "trainer.json")) as f:
        meta = json.load(f)
    cfg.parallel.tensor_parallel_size = 1
    resolve_model_config(cfg.model)
    model = build_model(cfg.model, tp_group(), cfg.train.seed, dtype)
    trainable = {n for n, p in model.named_parameters() if _is_trainable(model, n)}
    with _safely():
        if meta["tp_size"] == 1:
            trained = get_fp32_state_dict_from_zero_checkpoint(path, tag="ds", exclude_frozen_parameters=True)
        else:
            with tempfile.TemporaryDirectory(prefix="flamingo-universal-") as tmp:
                made = os.path.join(path, "universal")
                folder = os.path.join(made if os.path.isdir(made) else _to_universal(path, 0, os.path.join(tmp, "u")),
                                      "zero")
                trained = {n: torch.load(os.path.join(folder, n, "fp32.pt"), weights_only=True)[PARAM]
                           for n in sorted(trainable) if os.path.isdir(os.path.join(folder, n))}
    result = model.load_state_dict(trained, strict=False)
    missing_trainable = sorted(set(result.missing_keys) & trainable)
    if missing_trainable or result.unexpected_keys:
        raise CheckpointError(f"{path}: trainable weights do not match the model (missing {missing_trainable[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    return model.eval(), cfg


def tokenizer_dir(cfg) -> str:
    """Where a job's tokenizer lives: data.tokenizer, else the base LM or IDEFICS checkpoint, else
    the synthetic corpus's."""
    d = cfg.data
    return d.tokenizer or cfg.model.lm.path or cfg.model.init_from or os.path.join(d.synthetic_dir, "tokenizer")


def _is_trainable(model, name: str) -> bool:
    ids = {id(p) for m in model.trainable_modules() for p in m.parameters()}
    return id(model.get_parameter(name)) in ids
