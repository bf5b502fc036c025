"""The `gateskip` command: one subcommand per module, user mistakes as one-line errors."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from . import demo
from .errors import GateSkipError
from .evaluation import analysis, tasks
from .evaluation import cli as evaluation
from .inference import bench, calibrate, generation
from .search import allocation, baselines, proxy
from .serving import server
from .training import command as train
from .validate import Parser

COMMANDS = (demo, train, calibrate, allocation, proxy, generation, evaluation, tasks, baselines, analysis, bench, server)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gateskip", description="Learned token skipping for decoder-only LMs (GateSkip).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder tree that holds no file (what a failed command may have begun)."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a user mistake, which is printed as one `error:` line)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "passes_through", False):  # only `serve` hands options on (to vLLM)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or argparse's own one-line error (Parser.error)
        return int(e.code or 0)
    args.extra = extra
    out = getattr(args, "out", None)
    new = Path(out).expanduser() if out and not Path(out).expanduser().exists() else None
    try:
        return int(args.func(args) or 0)
    except GateSkipError as e:
        if new is not None:  # a failed check leaves no empty folder behind
            _remove_if_empty(new)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
