"""`gateskip --help` starts fast and quietly: the heavy libraries load only in the commands that use them.

Each check runs in a fresh interpreter, since this test session has imported everything already.
"""

import json
import subprocess
import sys

HEAVY = ("lm_eval", "torchao", "peft", "transformers.modeling_utils", "vllm")
TORCHAO_NOISE = ("Failed to load", "is an Enum subclass")


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args],
                          capture_output=True, text=True, timeout=120)


def test_parser_and_help_import_no_heavy_library():
    code = f"""
import json, sys
from gateskip import cli
cli.build_parser()
built = [m for m in {HEAVY!r} if m in sys.modules]
try:
    cli.main(["--help"])
except SystemExit:
    pass
print(json.dumps({{"built": built, "help": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    done = python(code)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded == {"built": [], "help": []}


def test_help_prints_no_torchao_noise():
    done = python("", "-m", "gateskip.cli", "--help")
    assert done.returncode == 0, done.stderr
    assert "eval" in done.stdout and "train" in done.stdout
    assert not any(line in done.stderr for line in TORCHAO_NOISE), done.stderr


def test_torchao_import_is_quiet_after_gateskip():
    """transformers imports torchao with any model, so its import-time warnings are filtered, not avoided."""
    done = python("import gateskip, torchao, logging; logging.getLogger('torchao').warning('torchao still speaks')")
    assert done.returncode == 0, done.stderr
    assert not any(line in done.stderr for line in TORCHAO_NOISE), done.stderr
    assert "torchao still speaks" in done.stderr  # only the known messages are dropped
