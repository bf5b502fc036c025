"""The README's API example runs as written (on the bundled model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gates").symlink_to(README.parent / "gates")  # the example names the shipped gates from the repo root
    exec(compile(code, str(README), "exec"), {})
    assert "net FLOP saving" in capsys.readouterr().out
    assert (tmp_path / "my-gates" / "gateskip.safetensors").is_file()
