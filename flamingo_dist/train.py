"""Training entry point, the same under every launcher:

    deepspeed [--num_gpus N] flamingo_dist/train.py --deepspeed ds_configs/zero2.json [--config x.yaml]
    torchrun --nproc_per_node N flamingo_dist/train.py --deepspeed ds_configs/zero2.json
    python -m flamingo_dist.train --deepspeed ds_configs/zero2.json --set train.steps=5

`--deepspeed PATH` is ours (the Hugging Face Trainer convention). Without `--config` it trains
the debug flavor on the synthetic corpus, generated when missing. The config is parsed and
validated before any heavy import, so a bad value fails in a second.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

_START = time.time()

if __package__ in (None, ""):  # run as a script: import the package, not its folder's modules
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0] = _root

from flamingo_dist.config.load import load_config, validate  # noqa: E402
from flamingo_dist.config.schema import ConfigError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Flamingo model.")
    p.add_argument("--deepspeed", required=True, metavar="PATH", help="DeepSpeed JSON config (see ds_configs/)")
    p.add_argument("--config", metavar="YAML", help="our training config; default: the debug flavor")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set train.steps=5 (repeatable)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest committed checkpoint "
                   "(auto) or from PATH; same as --set checkpoint.resume=...")
    p.add_argument("--debug", action="store_true", help="show the traceback of a start-up error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def checked_inputs(config: str | None, overrides: list[str], deepspeed: str, world_size: int):
    """The validated job config for this world size; ConfigError naming every problem (a bad
    field, YAML syntax, a missing shard or DeepSpeed config, a resume path that is no checkpoint,
    an LM config.json we cannot represent, no tokenizer) before anything heavy is imported."""
    from flamingo_dist.training.inputs import check_inputs

    cfg = load_config(config, overrides)
    validate(cfg, world_size=world_size)
    check_inputs(cfg, deepspeed)
    return cfg


def print_error(e: Exception, debug: bool = False) -> None:
    """One `error:` line per problem (a ConfigError may list several); the traceback with --debug."""
    if debug:
        import traceback

        traceback.print_exception(e)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "invalid config:" and its problems
        lines = lines[1:]
    for line in lines or [type(e).__name__]:
        print(f"error: {line}", file=sys.stderr)


def main(argv=None) -> int:
    from flamingo_dist import setup_logging
    from flamingo_dist.distributed import slurm

    setup_logging()
    # first: a stop signal now ends the process with one line, and once training runs (the flag is
    # armed) it is a stop-and-save; ranks whose launcher died stop the same way
    stop_flag = slurm.StopFlag().install()
    slurm.watch_launcher(stop_flag)
    args = parse_args(argv)
    if slurm.started_by_srun() and args.local_rank is None:  # one srun task per rank (not torchrun's)
        slurm.export_torch_env()
    try:
        overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        cfg = checked_inputs(args.config, overrides, args.deepspeed, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print_error(e, args.debug)
        return 2

    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed
    from flamingo_dist.training.checkpoint import CheckpointError
    from flamingo_dist.training.trainer import Trainer, TrainingStopped

    layout = init_distributed(cfg.parallel.tensor_parallel_size)
    trainer = Trainer(cfg, args.deepspeed, layout)
    trainer.stop_flag = stop_flag
    status, code = "FAILED", 0
    try:
        trainer.build()
        trainer.log(f"started in {time.time() - _START:.1f}s; "
                    f"world {layout.world_size} = TP {layout.tp_size} x DP {layout.dp_size} on {layout.device}; "
                    f"run dir {cfg.tracking.run_dir}; MLflow run {trainer.tracker.run_id if trainer.tracker else None}")
        state = trainer.train()
        if trainer.stopped:
            status = "KILLED"
            code = slurm.finish_stop(cfg.tracking.run_dir, layout.rank, cfg.slurm.signal_lead_s,
                                     cfg.slurm.max_timeout_requeues)
        else:
            trainer.log(f"done: {state.step} steps, {state.skipped_steps} skipped, {state.tokens_seen} tokens")
            status = "FINISHED"
    except ConfigError as e:
        print_error(e, args.debug)
        return 2
    except (TrainingStopped, CheckpointError) as e:  # the run cannot go on (bad data, diverged, a checkpoint
        print(f"error: {e}", file=sys.stderr)       # that cannot be read or written); the message says why
        return 1
    finally:
        trainer.close(status)
        destroy_distributed()
    return code


class TrainTask:
    """What submitit runs in each task: the training entry point (which takes rank and world
    from SLURM, as under srun). Picklable and importable from the package, so the job loads it."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        code = main(self.argv)
        if code != 0:  # submitit writes a result only for a return: a stop or an error is an exit
            sys.stdout.flush()
            raise SystemExit(code)
        return code


if __name__ == "__main__":
    exit_code = main()
    # The process ends here, with every file written and closed by main (metrics per line,
    # checkpoints committed, the tracker closed): spare the interpreter's collections at shutdown
    # over the ~670k objects that torch, DeepSpeed and transformers leave (about 2 s per rank).
    gc.freeze()
    sys.exit(exit_code)
