"""What a run learned, from its own records: `<run_dir>/metrics.jsonl` (training loss, gates,
validation loss and held-out attribute accuracy with true, shuffled and no images) and
`<run_dir>/eval/step_*.json` (the few-shot suite). Writes `learning.json` (the final numbers, the
checks they pass or fail, and the backbones they were trained on) and `report.png` (the curves),
and renders a short table.

The checks are the demo's claims: each attribute read from the true images at >= 0.95
on held-out documents and at most 0.10 above chance with shuffled images; synthetic shapes
classification and colour VQA >= 90 at 4 shots; and in-context learning (the binding pair of
the suite, when run): labels bound afresh in every prompt are named at <= chance + 0.05 with
0 shots, >= 0.90 with 4 shots per class, not falling from 1 to 2 to 4 shots (by more than
MAX_DIP, the sampling noise of 240 queries near the ceiling), and at <= chance + 0.10 with the
images shuffled across the prompt, at every shot count.
"""

from __future__ import annotations

import glob
import json
import os

from flamingo_dist.data.synthetic import ATTRIBUTES, BINDING_VALUES

MIN_TRUE_ACCURACY = 0.95
MAX_SHUFFLED_ABOVE_CHANCE = 0.10
MIN_FEW_SHOT = {("synthetic_shapes", "4shot_random"): 90.0, ("synthetic_vqa_color", "4shot_random"): 90.0}
CONDITIONS = ("true", "shuffled", "no")
BINDING_CHANCE = 1.0 / len(BINDING_VALUES)
MAX_ZERO_SHOT_ABOVE_CHANCE = 0.05
MIN_BINDING_4_SHOTS = 0.90
MAX_DIP = 0.02  # a 1 -> 2 -> 4 shots step may fall by at most this (2 sd of 240 queries at 0.97)


def in_context(few_shot: dict) -> dict:
    """{shots: {"true", "shuffled"}} accuracy (0-1) of the binding pair, from the suite's scores."""
    out: dict = {}
    for task, cond in (("synthetic_binding", "true"), ("synthetic_binding_shuffled", "shuffled")):
        for config, score in few_shot.get(task, {}).items():
            out.setdefault(int(config.split("shot")[0]), {})[cond] = score / 100.0
    return dict(sorted(out.items()))


def in_context_checks(curve: dict) -> list[dict]:
    checks = []
    if 0 in curve:
        limit = BINDING_CHANCE + MAX_ZERO_SHOT_ABOVE_CHANCE
        checks.append({"check": f"binding at 0 shots <= chance + {MAX_ZERO_SHOT_ABOVE_CHANCE} ({limit:.3f})",
                       "value": curve[0]["true"], "pass": curve[0]["true"] <= limit})
    value = curve.get(4, {}).get("true")
    checks.append({"check": f"binding at 4 shots per class >= {MIN_BINDING_4_SHOTS}", "value": value,
                   "pass": value is not None and value >= MIN_BINDING_4_SHOTS})
    rising = [curve[k]["true"] for k in (1, 2, 4) if k in curve]
    checks.append({"check": f"binding does not fall from 1 to 2 to 4 shots (by more than {MAX_DIP})", "value": rising,
                   "pass": len(rising) == 3 and all(b >= a - MAX_DIP for a, b in zip(rising, rising[1:]))})
    for shots, acc in curve.items():
        if "shuffled" in acc:
            limit = BINDING_CHANCE + MAX_SHUFFLED_ABOVE_CHANCE
            checks.append({"check": f"binding at {shots} shots with shuffled images <= chance + "
                                    f"{MAX_SHUFFLED_ABOVE_CHANCE} ({limit:.3f})",
                           "value": acc["shuffled"], "pass": acc["shuffled"] <= limit})
    return checks


def read_metrics(run_dir: str) -> dict[int, dict]:
    """Step -> every metric logged at that step (training and validation lines merged)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics (did the run start?)")
    steps: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                steps.setdefault(row["step"], {}).update(row)
    return dict(sorted(steps.items()))


def read_evals(run_dir: str) -> dict[int, dict]:
    """Step -> {task: {config: mean score}} of the few-shot evaluations."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "step_*.json"))):
        with open(path) as f:
            res = json.load(f)
        out[res["step"]] = {task: {c: v["mean"] for c, v in r.items()} for task, r in res["tasks"].items()}
    return out


def _backbones(run_dir: str) -> dict | None:
    """The DONE record of the synthetic backbones the run's LM came from (via its checkpoint's
    config), if any."""
    configs = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "config.json")))
    if not configs:
        return None
    with open(configs[-1]) as f:
        lm_path = json.load(f)["job"]["model"]["lm"]["path"]
    done = os.path.join(os.path.dirname(lm_path), "DONE") if lm_path else None
    if done and os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    return None


def learning_summary(run_dir: str) -> dict:
    metrics, evals = read_metrics(run_dir), read_evals(run_dir)
    val_steps = [s for s, m in metrics.items() if "val/loss" in m]
    if not val_steps:
        raise ValueError(f"{run_dir}: no validation was logged (set data.val_every_steps)")
    last_val = metrics[val_steps[-1]]
    attributes = {}
    for group, words in ATTRIBUTES.items():
        if f"val/accuracy/true_images/{group}" in last_val:
            attributes[group] = {c: last_val[f"val/accuracy/{c}_images/{group}"] for c in CONDITIONS}
            attributes[group]["chance"] = 1.0 / len(words)
            attributes[group]["majority"] = last_val[f"val/accuracy/majority/{group}"]
    train_steps = [s for s, m in metrics.items() if "loss" in m]
    last = metrics[train_steps[-1]]
    gates = {k.removeprefix("gate/"): {"tanh_alpha": v, "abs_tanh_alpha": abs(v)}
             for k, v in last.items() if k.startswith("gate/")}
    few_shot = evals[max(evals)] if evals else {}
    checks = []
    if not attributes:
        checks.append({"check": "held-out attribute accuracy logged", "value": None, "pass": False})
    for group, acc in attributes.items():
        checks.append({"check": f"held-out {group} with true images >= {MIN_TRUE_ACCURACY}", "value": acc["true"],
                       "pass": acc["true"] >= MIN_TRUE_ACCURACY})
        limit = acc["chance"] + MAX_SHUFFLED_ABOVE_CHANCE
        checks.append({"check": f"held-out {group} with shuffled images <= chance + {MAX_SHUFFLED_ABOVE_CHANCE} "
                                f"({limit:.3f})", "value": acc["shuffled"], "pass": acc["shuffled"] <= limit})
    for (task, config), floor in MIN_FEW_SHOT.items():
        value = few_shot.get(task, {}).get(config)
        checks.append({"check": f"{task} {config} >= {floor}", "value": value,
                       "pass": value is not None and value >= floor})
    curve = in_context(few_shot)
    if curve:
        checks += in_context_checks(curve)
    return {
        "run_dir": run_dir, "step": train_steps[-1], "validation_step": val_steps[-1],
        "in_context_binding": {"chance": BINDING_CHANCE, "accuracy_by_shots": curve},
        "loss": {"first": metrics[train_steps[0]]["loss"], "last": last["loss"],
                 "val_first": metrics[val_steps[0]]["val/loss"], "val_last": last_val["val/loss"]},
        "held_out_attribute_accuracy": attributes, "few_shot": few_shot,
        "few_shot_step": max(evals) if evals else None, "gates": gates,
        "backbones": _backbones(run_dir), "checks": checks, "passed": all(c["pass"] for c in checks),
    }


def plot(run_dir: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, evals = read_metrics(run_dir), read_evals(run_dir)
    fig, ax = plt.subplots(2, 3, figsize=(17, 8.5))
    train = [(s, m["loss"]) for s, m in metrics.items() if "loss" in m]
    val = [(s, m["val/loss"]) for s, m in metrics.items() if "val/loss" in m]
    a = ax[0, 0]
    a.plot(*zip(*train), label="training loss", lw=1)
    if val:
        a.plot(*zip(*val), "o-", label="validation loss (held-out documents)")
    a.set_yscale("log")
    a.set(title="Loss", xlabel="step", ylabel="mean token loss")
    a.legend()
    a = ax[0, 1]
    gate_names = sorted({k for m in metrics.values() for k in m if k.startswith("gate/")})
    for name in gate_names:
        pts = [(s, m[name]) for s, m in metrics.items() if name in m]
        a.plot(*zip(*pts), label=name.removeprefix("gate/"))
    a.axhline(0, color="grey", lw=0.5)
    a.set(title="Gates tanh(alpha)", xlabel="step")
    a.legend(fontsize=8)
    a = ax[1, 0]
    styles = {"true": "-", "shuffled": "--", "no": ":"}
    for k, (group, words) in enumerate(ATTRIBUTES.items()):
        color = f"C{k}"
        for cond, ls in styles.items():
            name = f"val/accuracy/{cond}_images/{group}"
            pts = [(s, m[name]) for s, m in metrics.items() if name in m]
            if pts:
                a.plot(*zip(*pts), ls, color=color, marker="o", ms=3, label=f"{group}, {cond} images")
        a.axhline(1.0 / len(words), color=color, lw=0.5, alpha=0.6)
    a.set(title="Held-out attribute accuracy (thin lines: chance)", xlabel="step", ylabel="top-1", ylim=(0, 1.3),
          yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a.legend(fontsize=7, ncol=3, loc="upper center")
    a = ax[1, 1]
    configs = sorted({(t, c) for e in evals.values() for t, r in e.items() for c in r})
    for t, c in configs:
        scale = 100.0 if t.endswith("captions") else 1.0  # CIDEr is about 0-2, the others 0-100
        pts = [(s, scale * e[t][c]) for s, e in evals.items() if c in e.get(t, {})]
        a.plot(*zip(*pts), "o-", label=f"{t.removeprefix('synthetic_')} {c.split('_')[0]}")
    a.set(title="Few-shot suite (captions: CIDEr x 100)" if configs else "Few-shot suite (none run)",
          xlabel="step", ylabel="score")
    if configs:
        a.legend(fontsize=7, ncol=2)
    a = ax[0, 2]
    curve = in_context(evals[max(evals)]) if evals else {}
    for cond, ls in (("true", "o-"), ("shuffled", "s--")):
        pts = [(k, v[cond]) for k, v in curve.items() if cond in v]
        if pts:
            a.plot(*zip(*pts), ls, label=f"{cond} images")
    a.axhline(BINDING_CHANCE, color="grey", lw=0.8, label="chance")
    a.set(title=f"In-context learning: labels bound per prompt (step {max(evals) if evals else '-'})"
          if curve else "In-context learning (binding pair not run)", xlabel="shots per class",
          ylabel="accuracy", ylim=(0, 1.05), xticks=sorted(curve) or [0, 1, 2, 4])
    a.legend(fontsize=8)
    a = ax[1, 2]
    for cond, task in (("true", "synthetic_binding"), ("shuffled", "synthetic_binding_shuffled")):
        for c in sorted({c for e in evals.values() for c in e.get(task, {})}):
            pts = [(s, e[task][c] / 100.0) for s, e in evals.items() if c in e.get(task, {})]
            a.plot(*zip(*pts), "o-" if cond == "true" else "s--", ms=3, label=f"{c.split('_')[0]}, {cond}")
    a.axhline(BINDING_CHANCE, color="grey", lw=0.8)
    a.set(title="Binding accuracy during training", xlabel="step", ylim=(0, 1.05))
    a.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: a Flamingo learning to read its images, "
                 "and to learn from its prompt")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = [f"held-out attribute accuracy at step {summary['validation_step']} (top-1):",
             f"  {'':8}{'true':>8}{'shuffled':>10}{'no img':>8}{'chance':>8}{'majority':>10}"]
    for group, acc in summary["held_out_attribute_accuracy"].items():
        lines.append(f"  {group:8}" + "".join(f"{acc[c]:>{w}.3f}" for c, w in
                                              (("true", 8), ("shuffled", 10), ("no", 8), ("chance", 8),
                                               ("majority", 10))))
    if summary["few_shot"]:
        lines.append(f"few-shot suite at step {summary['few_shot_step']}:")
        for task, r in summary["few_shot"].items():
            lines.append(f"  {task:22}" + "  ".join(f"{c} {v:6.2f}" for c, v in r.items()))
    curve = summary.get("in_context_binding", {}).get("accuracy_by_shots", {})
    if curve:
        lines.append("in-context learning (labels bound per prompt; chance "
                     f"{summary['in_context_binding']['chance']:.3f}), accuracy by shots per class:")
        lines.append("  shots     " + "".join(f"{k:>8}" for k in curve))
        for cond in ("true", "shuffled"):
            lines.append(f"  {cond + ' images':10}" + "".join(f"{v.get(cond, float('nan')):>8.3f}"
                                                            for v in curve.values()))
    lines.append("gates |tanh(alpha)|: " + ", ".join(f"{k} {v['abs_tanh_alpha']:.3f}" for k, v in
                                                    summary["gates"].items()))
    lines.append(f"loss {summary['loss']['first']:.3f} -> {summary['loss']['last']:.3f}, validation loss "
                 f"{summary['loss']['val_first']:.3f} -> {summary['loss']['val_last']:.3f}")
    for c in summary["checks"]:
        v = c["value"]
        value = "missing" if v is None else " -> ".join(f"{x:.3f}" for x in v) if isinstance(v, list) else f"{v:.3f}"
        lines.append(f"  [{'pass' if c['pass'] else 'FAIL'}] {c['check']}: {value}")
    return "\n".join(lines)


def write_report(run_dir: str) -> dict:
    """learning.json and report.png in run_dir; returns the summary."""
    summary = learning_summary(run_dir)
    with open(os.path.join(run_dir, "learning.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(run_dir, os.path.join(run_dir, "report.png"))
    return summary
