"""Seed a sweep folder with another sweep's base records, so `gateskip eval` resumes them.

    python experiments/task_tables/base_rows.py SRC DST TASKS [--gates PATH]

Writes DST holding only SRC's base records of TASKS (comma-separated), unless DST exists
(then a sweep into DST's folder resumes what it holds). --gates names PATH in DST's settings:
the base model's records do not depend on the gates, and a resumed sweep must name the same.
"""

import argparse
import json
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("src", type=Path)
p.add_argument("dst", type=Path)
p.add_argument("tasks")
p.add_argument("--gates")
args = p.parse_args()
if not args.dst.exists():
    sweep = json.loads(args.src.read_text())
    tasks = args.tasks.split(",")
    sweep["records"] = [r for r in sweep["records"] if r["method"] == "base" and r["task"] in tasks]
    if args.gates is not None:
        sweep["settings"]["gates"] = args.gates
    args.dst.write_text(json.dumps(sweep, indent=1))
