#!/usr/bin/env python3
"""Paired accuracy differences between rows of one or more `quality.py --json` runs.

Models evaluated on the same documents (same --task-data, --tasks and --limit) can be
compared document by document even when they came from different runs: the evaluation
is deterministic, so a row's per-document scores do not depend on the run it was in.

    python benchmarks/paired.py run1.json run2.json --ref shortgpt

Prints each row's paper-style average and its difference to the --ref row with the
paired standard error (a gap within about two of them is noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from come.evaluation.evaluate import paired_delta
from come.evaluation.report import delta_cell


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="quality.py --json files")
    ap.add_argument("--ref", default="shortgpt", help="row every other row is set against")
    a = ap.parse_args()
    rows: dict[str, dict] = {}
    for path in a.runs:
        for r in json.loads(Path(path).read_text()):
            if "per_task" in r:
                rows.setdefault(r["method"], r)  # the first run that has a row wins
    if a.ref not in rows:
        raise SystemExit(f"--ref {a.ref!r}: no row with per-document scores of that name in {', '.join(a.runs)}")
    ref = rows[a.ref]
    print(f"| method | average | vs {a.ref} (± paired SE) |\n|---|---|---|")
    for name, r in rows.items():
        paired = paired_delta(r["per_task"], ref["per_task"]) if r is not ref else None
        cell = delta_cell({"average": paired[0], "se": paired[1]} if paired else None)
        print(f"| {name} | {r['average']:.3f} | {cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
