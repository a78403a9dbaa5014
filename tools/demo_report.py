"""Turn a run into its learning report: <run_dir>/learning.json, <run_dir>/report.png and a table
(flamingo_dist/demo/report.py). `--check` exits 1 when a check of the demo fails.

    python tools/demo_report.py runs/demo [--check]
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    from flamingo_dist.demo.report import table, write_report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--check", action="store_true", help="exit 1 when any check fails")
    args = p.parse_args(argv)
    try:
        summary = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(summary))
    print(f"wrote {os.path.join(args.run_dir, 'learning.json')} and {os.path.join(args.run_dir, 'report.png')}")
    if args.check and not summary["passed"]:
        print("error: the demo's checks did not all pass (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
