"""What a hang left behind, in a few lines: which rank is stuck where, and which collective the
others wait in.

    python tools/hang_report.py RUN_DIR          # or RUN_DIR/hang, or an older RUN_DIR/hang-<time>

Reads the reports of the hang watchdog (flamingo_dist/training/watchdog.py): `rank<r>.json` per
rank (phase, step, the last collective entered, the top of the main thread's stack) and points to
`rank<r>.stacks.txt` for the full stacks. A rank that is not inside a collective while others
wait in one is the stuck one; a rank whose collective has an older sequence number than the
others' took a different path; a rank that wrote nothing is named too (dead, or stuck holding the
interpreter). Exit status 0 when a report was read, 2 when there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load(path: str) -> tuple[str, dict[int, dict]]:
    d = path if os.path.basename(os.path.normpath(path)).startswith("hang") else os.path.join(path, "hang")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no hang reports in {path} (expected {d}/rank<r>.json)")
    reports = {}
    for name in sorted(os.listdir(d)):
        if name.startswith("rank") and name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                r = json.load(f)
            reports[int(r["rank"])] = r
    if not reports:
        raise FileNotFoundError(f"no hang reports in {d}")
    return d, reports


def _collective(c: dict) -> str:
    if not c.get("name"):
        return "no collective yet"
    group = c.get("group_ranks")
    return f"{c['name']} #{c['seq']} over ranks {group} ({c.get('bytes', 0)} bytes)"


def summarize(d: str, reports: dict[int, dict]) -> list[str]:
    world = max(r["world_size"] for r in reports.values())
    lines = [f"hang reports of {len(reports)} of {world} ranks in {d}"]
    waiting, stuck = [], []
    for rank in sorted(reports):
        r = reports[rank]
        c = r["collective"]
        where = f"{r['phase']} of step {r['step']} for {r['seconds_in_phase']:.0f}s (limit {r['limit_s']:g}s)"
        top = r["main_stack"][0] if r.get("main_stack") else "?"
        if c.get("inside"):
            waiting.append(rank)
            lines.append(f"rank {rank} ({r['host']}, pid {r['pid']}): {where}, waiting {c['seconds_inside']:.0f}s in "
                         f"{_collective(c)}")
        else:
            stuck.append(rank)
            lines.append(f"rank {rank} ({r['host']}, pid {r['pid']}): {where}, in no collective (last: "
                         f"{_collective(c)}); at {top}")
    missing = sorted(set(range(world)) - set(reports))
    if missing:
        lines.append(f"no report from ranks {missing}: dead, or stuck where the watchdog thread cannot run")
    if waiting and stuck:
        names = sorted({_collective(reports[r]["collective"]) for r in waiting})
        lines.append(f"stuck: rank{'s' if len(stuck) > 1 else ''} {', '.join(map(str, stuck))} (outside any "
                     f"collective); the others wait for {'it' if len(stuck) == 1 else 'them'} in {'; '.join(names)}")
    elif waiting:
        seqs = {reports[r]["collective"]["seq"] for r in waiting}
        behind = [r for r in waiting if reports[r]["collective"]["seq"] == min(seqs)] if len(seqs) > 1 else []
        if behind:
            lines.append(f"stuck: every rank waits in a collective, ranks {behind} in an earlier one "
                         f"(#{min(seqs)}): they took a different path")
        else:
            lines.append("stuck: every reporting rank waits in the same collective: look at the ranks without a "
                         "report, or at the network")
    else:
        lines.append("stuck: no rank is in a collective: every rank is slow or stuck in its own work (see stacks)")
    lines.append(f"full stacks: {d}/rank<r>.stacks.txt")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the run directory, or its hang/ folder")
    args = p.parse_args(argv)
    try:
        d, reports = load(args.path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summarize(d, reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
