"""Write docs/cli.md from the argparse parsers: COLUMNS=100 .venv/bin/python docs/gen_cli.py > docs/cli.md"""
import argparse
from gateskip.cli import build_parser

parser = build_parser()
sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
print("# CLI reference\n")
print("Generated from the argparse parsers of `gateskip` (each block is exactly what `gateskip COMMAND --help`")
print("prints, at 100 columns). Regenerate after changing an option:\n")
print("```sh")
print("COLUMNS=100 .venv/bin/python docs/gen_cli.py > docs/cli.md")
print("```\n")
print("What each command refuses, and which outputs it never overwrites without `--overwrite`: [errors.md](errors.md).\n")
print("```text\n" + parser.format_help().rstrip() + "\n```\n")
helps = {a.dest: a.help for a in sub._choices_actions}
for name, p in sub.choices.items():
    print(f"## gateskip {name}\n\n{helps.get(name, '')}\n\n```text\n{p.format_help().rstrip()}\n```\n")
