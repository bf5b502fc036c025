"""Is a row ahead of another at equal net saving? From sweep.py's results.json: for each point of
row B (default ShortGPT), row A's pass@1 read off its curve at B's measured net saving (linear
between A's two neighbouring measured points, as `gateskip proxy` reads its curves), and the
difference against the combined standard error; and for each pair of points at the same target, the paired difference (both rows score the
same problems, so the per-problem differences give a tighter standard error).

    .venv/bin/python experiments/long_form/compare_rows.py docs/results/long_form/sweep/results.json \
        | tee docs/results/long_form/sweep/compare.log
"""

from __future__ import annotations

import argparse
import json
import math

from gateskip.search.proxy import interpolate


def read_at(points: list[dict], saving: float) -> tuple[float, float] | None:
    """(pass@1, stderr) of a row at a net saving, both linear between its measured neighbours as
    the proxy reads its curves (an upper bound on the interpolated value's own standard error);
    None outside the measured range."""
    value = interpolate(points, saving, "pass@1")
    return None if value is None else (value, interpolate(points, saving, "stderr"))


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean per-problem difference a - b and its standard error."""
    d = [x - y for x, y in zip(a["passed"], b["passed"])]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
    return mean, sd / math.sqrt(len(d))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--a", default="gateskip-answers")
    p.add_argument("--b", default="shortgpt")
    args = p.parse_args()
    records = json.load(open(args.results))
    base = {r["task"]: r for r in records if r["row"] == "base"}
    for task in sorted({r["task"] for r in records}):
        rows = {name: [r for r in records if r["task"] == task and r["row"] in (name, "base")] for name in (args.a, args.b)}
        print(f"{task}: {args.a} read at {args.b}'s measured saving")
        for b in sorted((r for r in rows[args.b] if r["row"] == args.b), key=lambda r: r["net_saving"]):
            at = read_at(rows[args.a], b["net_saving"])
            if at is None:
                print(f"  {b['net_saving']:.3f}: {args.b} {b['pass@1']:.3f}; {args.a} not measured this far")
                continue
            diff, se = at[0] - b["pass@1"], math.sqrt(at[1] ** 2 + b["stderr"] ** 2)
            print(f"  {b['net_saving']:.3f}: {args.a} {at[0]:.3f} vs {args.b} {b['pass@1']:.3f}: {diff:+.3f}, "
                  f"combined se {se:.3f} ({diff / se:+.1f} se)")
        print(f"{task}: points at the same target, paired over the {base[task]['problems']} problems")
        for a in sorted((r for r in rows[args.a] if r["row"] == args.a), key=lambda r: r["target"]):
            b = next((r for r in rows[args.b] if r["row"] == args.b and r["target"] == a["target"]), None)
            if b is None:
                continue
            diff, se = paired(a, b)
            z = f"{diff / se:+.1f} se" if se else "no problem differs" if diff == 0 else "every problem differs alike"
            print(f"  target {a['target']:g}: {args.a} {a['pass@1']:.3f} at {a['net_saving']:.3f} vs {args.b} "
                  f"{b['pass@1']:.3f} at {b['net_saving']:.3f}: {diff:+.3f}, paired se {se:.3f} ({z})")


if __name__ == "__main__":
    main()
