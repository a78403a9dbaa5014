"""What makes the demo's Flamingo learn to read its images fast: the demo config (configs/demo.yaml)
with one thing changed per variant, each trained through the real entry point, compared on the
held-out attribute accuracy with true images (docs/learning.md has the results).

    python tools/learning_sweep.py --out runs/sweep [--steps 600] [--only baseline lr_1e-2 ...]
    python tools/learning_sweep.py --out runs/sweep --plot-only

Writes <out>/<variant>/ (each run), <out>/sweep.json (per variant: the first step at which each
attribute reached 0.95, the final accuracies with true and shuffled images, wall time) and
<out>/sweep.png (the curves). Variants that need other backbones (an LM pretrained without the
image descriptions) build them into <out>/backbones-*/ first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BACKBONES = "data/backbones"
CORPUS = "data/synthetic-demo"


def _own_weights(lm: str, vit: str | None) -> list[str]:
    """Overrides for a run on given weights instead of the flavor's synthetic backbones (the
    demo corpus then comes as shards with the backbones' tokenizer)."""
    from flamingo_dist.data.synthetic import ATTRIBUTES

    words = "{" + ", ".join(f"{g}: [{', '.join(w)}]" for g, w in ATTRIBUTES.items()) + "}"
    sets = ["model.synthetic_backbones=null", f"model.lm.path={lm}", f"data.shards={CORPUS}",
            f"data.val_shards={CORPUS}/val", f"data.tokenizer={BACKBONES}/lm", f"eval.attribute_words={words}"]
    return sets + ([f"model.vision.pretrained={vit}"] if vit else [])


VARIANTS: dict[str, list[str]] = {  # each changes one thing of configs/demo.yaml (gates start at alpha 0.1)
    "demo": [],
    "demo_seed_7": ["train.seed=7"],
    "alpha_init_0": ["model.xattn.alpha_init=0.0"],  # the paper's (and our default) closed gates
    "alpha_init_0_seed_7": ["model.xattn.alpha_init=0.0", "train.seed=7"],
    "alpha_init_0_gates_lr_x10": ["model.xattn.alpha_init=0.0", "train.lr_scales={gates: 10}"],
    "alpha_init_0_xattn_lr_x3": ["model.xattn.alpha_init=0.0", "train.lr_scales={xattn: 3}"],
    "alpha_init_0.5": ["model.xattn.alpha_init=0.5"],
    "alpha_init_1.0": ["model.xattn.alpha_init=1.0"],
    "lr_1e-3": ["train.lr=1e-3"],
    "lr_1e-2": ["train.lr=1e-2"],
    "gates_lr_x10": ["train.lr_scales={gates: 10}"],
    "resampler_lr_x3": ["train.lr_scales={resampler: 3}"],
    "xattn_lr_x3": ["train.lr_scales={xattn: 3}"],
    "resampler_depth_1": ["model.resampler.depth=1"],
    "resampler_depth_4": ["model.resampler.depth=4"],
    "one_xattn_block": ["model.xattn.cross_layer_interval=2"],
    "micro_batch_4": ["train.micro_batch_size=4"],
    "micro_batch_16": ["train.micro_batch_size=16"],
    "random_vit": _own_weights(f"{BACKBONES}/lm", None),
    "lm_without_descriptions": [],  # filled in main(): needs its own LM
    "bf16": ["train.precision=bf16"],
}


def build_lm_without_descriptions(out: str) -> str:
    """The backbones' LM recipe, but pretrained on the corpus text with the images left out."""
    from flamingo_dist.config.load import load_config
    from flamingo_dist.demo.backbones import pretrain_lm

    path = os.path.join(out, "backbones-no-descriptions", "lm")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pretrain_lm(path, load_config().model.lm, seed=0, describe=False)
    return path


def output_rows(lm_dir: str) -> dict:
    """How different an LM's output rows of each attribute group's words are: the mean cosine
    between the rows of a group and the mean distance of a row from the group's mean row. Rows
    that are nearly the same cannot be told apart by any hidden state."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from flamingo_dist.data.synthetic import ATTRIBUTES

    tok = AutoTokenizer.from_pretrained(lm_dir)
    head = load_file(os.path.join(lm_dir, "model.safetensors"))["lm_head.weight"]
    out = {}
    for group, words in ATTRIBUTES.items():
        rows = head[tok.convert_tokens_to_ids(list(words))]
        cos = torch.nn.functional.cosine_similarity(rows[:, None], rows[None], dim=-1)
        off_diagonal = cos[~torch.eye(len(words), dtype=torch.bool)]
        out[group] = {"mean_cosine": round(off_diagonal.mean().item(), 3),
                      "spread": round((rows - rows.mean(0)).norm(dim=1).mean().item(), 3),
                      "row_norm": round(rows.norm(dim=1).mean().item(), 3)}
    return out


def run_variant(out: str, name: str, sets: list[str], steps: int, every: int) -> dict:
    run_dir = os.path.join(out, name)
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))  # a rerun starts a fresh curve
    args = [f"train.steps={steps}", f"data.val_every_steps={every}", "eval.every_steps=0", "eval.at_start=true",
            f"tracking.run_dir={run_dir}", "tracking.mlflow=false", "checkpoint.at_end=false", *sets]
    cmd = [sys.executable, "flamingo_dist/train.py", "--deepspeed", "ds_configs/zero2.json", "--config",
           "configs/demo.yaml", *[a for s in args for a in ("--set", s)]]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29731"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    info = {"seconds": round(time.time() - t0, 1), "overrides": sets}
    with open(os.path.join(run_dir, "sweep_run.json"), "w") as f:
        json.dump(info, f)
    return info


def summarize(out: str, names: list[str]) -> dict:
    from flamingo_dist.demo.report import read_metrics

    summary = {}
    for name in names:
        path = os.path.join(out, name)
        if not os.path.isfile(os.path.join(path, "sweep_run.json")):  # not run, or not finished
            continue
        metrics = read_metrics(path)
        val = {s: m for s, m in metrics.items() if "val/loss" in m}
        last = val[max(val)]
        with open(os.path.join(path, "sweep_run.json")) as f:
            entry: dict = {"steps": max(metrics), "val_loss": round(last["val/loss"], 4), **json.load(f)}
        for group in ("color", "shape", "size"):
            reached = [s for s, m in val.items() if m.get(f"val/accuracy/true_images/{group}", 0) >= 0.95]
            entry[group] = {"first_step_at_0.95": min(reached) if reached else None,
                            "true": round(last[f"val/accuracy/true_images/{group}"], 4),
                            "shuffled": round(last[f"val/accuracy/shuffled_images/{group}"], 4)}
        firsts = [entry[g]["first_step_at_0.95"] for g in ("color", "shape", "size")]
        # the first step from which all three stay >= 0.95 at every later validation
        ok = [s for s in sorted(val) if all(val[t].get(f"val/accuracy/true_images/{g}", 0) >= 0.95
                                            for t in val if t >= s for g in ("color", "shape", "size"))]
        entry["all_at_0.95"] = ok[0] if ok and None not in firsts else None
        gates = {k: round(abs(v), 4) for k, v in metrics[max(metrics)].items() if k.startswith("gate/")}
        entry["max_abs_tanh_alpha"] = max(gates.values()) if gates else None
        summary[name] = entry
    return summary


KEY_VARIANTS = ("demo", "alpha_init_0", "alpha_init_0_seed_7", "lr_1e-2", "micro_batch_4", "random_vit",
                "lm_without_descriptions")


def plot(out: str, summary: dict) -> None:
    """Top: held-out accuracy with true images over steps for the key variants; bottom: for
    every variant, the first validation step at which all three attributes were >= 0.95."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flamingo_dist.demo.report import read_metrics

    fig = plt.figure(figsize=(16, 11))
    axes = [fig.add_subplot(2, 3, k + 1) for k in range(3)]
    for k, name in enumerate(n for n in KEY_VARIANTS if n in summary):
        metrics = read_metrics(os.path.join(out, name))
        for ax, group in zip(axes, ("color", "shape", "size")):
            key = f"val/accuracy/true_images/{group}"
            pts = [(s, m[key]) for s, m in metrics.items() if key in m]
            ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{k}", label=name)
    for ax, group in zip(axes, ("color", "shape", "size")):
        ax.set(title=f"held-out {group} accuracy, true images", xlabel="step", ylim=(0, 1.02))
        ax.axhline(0.95, color="grey", lw=0.5)
    axes[0].set_ylabel("top-1")
    axes[2].legend(fontsize=8, loc="lower right")
    bars = fig.add_subplot(2, 1, 2)
    names = list(summary)
    steps = max(e["steps"] for e in summary.values())
    reached = [e["all_at_0.95"] for e in summary.values()]
    bars.barh(names, [r if r is not None else steps for r in reached],
              color=["C0" if r is not None else "lightgrey" for r in reached])
    for y, r in enumerate(reached):
        bars.text((r or steps) + 5, y, str(r) if r is not None else f"not within {steps}", va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set(title="first validation step with colour, shape and size all >= 0.95 on held-out documents",
             xlabel="step", xlim=(0, steps * 1.25))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()  # the package's messages (progress, resume, backbones) on rank 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100, help="validation every this many steps")
    p.add_argument("--only", nargs="*", help="run only these variants")
    p.add_argument("--plot-only", action="store_true", help="summarize and plot the runs already in --out")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    if not args.plot_only:
        if "lm_without_descriptions" in names:
            VARIANTS["lm_without_descriptions"] = _own_weights(build_lm_without_descriptions(out),
                                                               f"{BACKBONES}/vit.pt")
        for name in names:
            info = run_variant(out, name, VARIANTS[name], args.steps, args.every)
            print(f"{name}: {info['seconds']:.0f}s", flush=True)
    summary = summarize(out, list(VARIANTS))
    rows = {"backbones": output_rows(os.path.join(REPO, BACKBONES, "lm"))}
    no_desc = os.path.join(out, "backbones-no-descriptions", "lm")
    if os.path.isdir(no_desc):
        rows["lm_without_descriptions"] = output_rows(no_desc)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"variants": summary, "lm_output_rows": rows}, f, indent=1)
    for name, groups in rows.items():
        print(f"LM output rows, {name}: " + "; ".join(f"{g} cos {v['mean_cosine']} spread {v['spread']}"
                                                       for g, v in groups.items()))
    plot(out, summary)
    for name, e in summary.items():
        reached = " ".join(f"{g} {e[g]['first_step_at_0.95']}" for g in ("color", "shape", "size"))
        final = " ".join(f"{g} {e[g]['true']:.3f}/{e[g]['shuffled']:.3f}" for g in ("color", "shape", "size"))
        print(f"{name:26} 0.95 at: {reached:30} all: {e['all_at_0.95']}  final true/shuffled: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
