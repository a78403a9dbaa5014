"""Can a checkpoint be resumed with this run's config? (issue 20, item 6; docs/operations.md)

A change of any field that decides a parameter's shape, or of where the cross-attention blocks
sit, makes the checkpoint unloadable into the model: refused in one line naming every such field,
before the model is built. A change of the data order (seed, micro-batch, sequence length,
images, streams, mixture) is allowed and named in one warning. Everything else (steps, learning
rate, cadences, the layout) may change freely.
"""

from __future__ import annotations

import json
import logging
import os

from flamingo_dist.training.checkpoint import CheckpointError

log = logging.getLogger(__name__)

SHAPE_FIELDS = ("model.lm.vocab_size", "model.lm.hidden_size", "model.lm.intermediate_size", "model.lm.num_layers",
                "model.lm.num_heads", "model.lm.num_kv_heads", "model.lm.tie_embeddings", "model.vision.model_name",
                "model.resampler.num_latents", "model.resampler.depth", "model.resampler.num_heads",
                "model.resampler.head_dim", "model.resampler.qk_layer_norms", "model.resampler.max_frames",
                "model.xattn.alpha_type", "model.xattn.qk_layer_norms")


# what decides the sequence of documents and samples a resumed run sees (paths of shards are not
# compared: data moved elsewhere is the same data)
DATA_ORDER_FIELDS = ("train.seed", "train.micro_batch_size", "data.seq_len", "data.max_images", "data.image_size",
                     "data.frames_per_video", "data.pack", "data.streams", "data.synthetic_num_docs")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def data_order_differences(saved_job: dict, cfg) -> list[str]:
    """`field: saved -> now` for every field whose change gives the resumed run other data than
    an uninterrupted run would have seen (source names and weights included)."""
    from flamingo_dist.config.load import config_from_dict

    saved = config_from_dict(saved_job)
    out = [f"{f}: {_get(saved, f)!r} -> {_get(cfg, f)!r}" for f in DATA_ORDER_FIELDS if _get(saved, f) != _get(cfg, f)]
    mix = [(s.name, s.weight) for s in saved.data.sources], [(s.name, s.weight) for s in cfg.data.sources]
    if mix[0] != mix[1]:
        out.append(f"data.sources (name, weight): {mix[0]} -> {mix[1]}")
    return out


def resume_config_differences(saved_job: dict, cfg) -> list[str]:
    """`field: saved -> now` for every shape-deciding field the new config changes."""
    from flamingo_dist.config.load import config_from_dict
    from flamingo_dist.config.schema import xattn_layer_indices

    saved = config_from_dict(saved_job)
    out = [f"{f}: {_get(saved, f)!r} -> {_get(cfg, f)!r}" for f in SHAPE_FIELDS if _get(saved, f) != _get(cfg, f)]
    before, now = xattn_layer_indices(saved.model), xattn_layer_indices(cfg.model)
    if before != now:
        out.append(f"cross-attention blocks before layers {before} -> {now} (model.xattn placement/interval/layers)")
    return out


def check_resume_config(path: str, cfg) -> None:
    """Raise one CheckpointError naming every field whose change makes `path` unloadable into
    this run's model; warn in one line naming every field that changes the data order (fields
    that may change on resume, like steps, lr or the layout, are not checked: docs/operations.md)."""
    with open(os.path.join(path, "config.json")) as f:
        saved_job = json.load(f)["job"]
    differences = resume_config_differences(saved_job, cfg)
    if differences:
        raise CheckpointError(f"{path}: this run's model differs from the checkpoint's, which cannot be loaded into "
                              f"it: {'; '.join(differences)} (resume with the checkpoint's values, or start fresh "
                              "in another run directory)")
    data = data_order_differences(saved_job, cfg)
    if data:
        log.warning(f"resume: the data order differs from {path}'s: {'; '.join(data)}; training goes on, on other "
                    "data than an uninterrupted run would have seen")
