"""Write docs/config.md from the config docstrings (`--check`: fail if it is out of date)."""

import argparse
import os
import sys

from flamingo_dist.config.docs import render  # noqa: E402

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    text = render()
    if args.check:
        current = open(PATH).read() if os.path.isfile(PATH) else ""
        if current != text:
            print(f"{PATH} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    with open(PATH, "w") as f:
        f.write(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
