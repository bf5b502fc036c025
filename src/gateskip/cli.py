"""The `gateskip` command: one subcommand per module, user mistakes as one-line errors."""

from __future__ import annotations

import argparse
import sys

from . import allocation, analysis, baselines, bench, calibrate, demo, generation, proxy, train
from .evaluation import cli as evaluation
from .errors import GateSkipError

COMMANDS = (demo, train, calibrate, allocation, proxy, generation, evaluation, baselines, analysis, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateskip", description="Learned token skipping for decoder-only LMs (GateSkip).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GateSkipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
