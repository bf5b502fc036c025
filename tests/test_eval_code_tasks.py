"""HumanEval and MBPP as offline lm-eval generate_until tasks scored by executed tests (pass@1)."""

import sys
from importlib import resources
from pathlib import Path

import pytest

from gateskip.evaluation import tasks as T

TEMPLATES = Path(str(resources.files("gateskip") / "tasks"))
sys.path.insert(0, str(TEMPLATES))
import code_tasks as C  # noqa: E402  (lm-eval loads it by path from beside the YAMLs, as here)

CODE_TASKS = {"humaneval": 164, "mbpp": 500}


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    yield T.task_manager(list(CODE_TASKS), "bundled", tmp_path_factory.mktemp("code_tasks") / "tasks")
    mp.undo()


@pytest.fixture(scope="module")
def code_tasks(manager):
    return manager.load(list(CODE_TASKS))["tasks"]


class _Instance:
    """What lm-eval's filters read and write on a request."""

    def __init__(self, doc, completion):
        self.doc, self.resps, self.filtered_resps = doc, [completion], {}


def _pass_at_1(task, docs_and_completions) -> list[float]:
    """Score completions the way lm-eval does: the task's filters (which run the sandbox), then
    its process_results."""
    instances = [_Instance(doc, completion) for doc, completion in docs_and_completions]
    for ensemble in task._filters:
        ensemble.apply(instances)
    return [task.process_results(i.doc, [i.filtered_resps["sandbox"]])["pass@1"] for i in instances]


def test_tasks_load_offline_with_every_problem(code_tasks):
    for name, count in CODE_TASKS.items():
        task = code_tasks[name]
        assert len(task.eval_docs) == count
        assert task.OUTPUT_TYPE == "generate_until" and task.UNSAFE_CODE
        kwargs = task.config.generation_kwargs
        assert kwargs["do_sample"] is False and "\n```" in kwargs["until"] and kwargs["max_gen_toks"] >= 512
        assert task.aggregation()["pass@1"].__name__ == "mean" and task.higher_is_better()["pass@1"] is True
        assert task.config.gen_prefix.endswith("```python\n")  # the answer starts inside a code block


def test_prompts_show_the_problem(code_tasks):
    he, mbpp = code_tasks["humaneval"], code_tasks["mbpp"]
    doc = he.eval_docs[0]
    assert doc["doc"]["prompt"].strip() in he.doc_to_text(doc)
    doc = mbpp.eval_docs[0]
    text = mbpp.doc_to_text(doc)
    assert doc["doc"]["text"] in text and doc["doc"]["test_list"][0] in text


def test_canonical_humaneval_solutions_pass(code_tasks):
    task = code_tasks["humaneval"]
    docs = [task.eval_docs[i] for i in range(4)]
    body = [(d, d["doc"]["canonical_solution"]) for d in docs]  # a completion of the function body
    whole = [(d, d["doc"]["prompt"] + d["doc"]["canonical_solution"] + "```\n") for d in docs]  # a whole function
    fenced = [(d, "Here it is:\n```python\n" + d["doc"]["prompt"] + d["doc"]["canonical_solution"] + "```\nDone.")
              for d in docs]  # an answer that opened its own code block
    assert _pass_at_1(task, body + whole + fenced) == [1.0] * 12


def test_reference_mbpp_solutions_pass(code_tasks):
    task = code_tasks["mbpp"]
    docs = [task.eval_docs[i] for i in range(5)]
    assert _pass_at_1(task, [(d, d["doc"]["code"]) for d in docs]) == [1.0] * 5


def test_wrong_programs_score_zero(code_tasks):
    he, mbpp = code_tasks["humaneval"], code_tasks["mbpp"]
    h, m = he.eval_docs[0], mbpp.eval_docs[0]
    wrong_h = ["    return not " + h["doc"]["canonical_solution"].strip().splitlines()[-1].split("return ")[-1] + "\n",
               "    while True:\n        pass\n", "", "I cannot solve this."]
    assert _pass_at_1(he, [(h, c) for c in wrong_h[:1] + wrong_h[2:]]) == [0.0] * 3
    wrong_m = [m["doc"]["code"].replace("return s", "return s[::-1]"), "def other():\n    pass\n"]
    assert _pass_at_1(mbpp, [(m, c) for c in wrong_m]) == [0.0, 0.0]


@pytest.mark.parametrize("completion, code", [
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # generation inside the prompt's code block
    ("def f():\n    return 1\n```\nThis returns 1.", "def f():\n    return 1\n"),
    ("Sure:\n```python\ndef f():\n    return 1\n```\n", "def f():\n    return 1\n"),
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("    return 1\n", "    return 1\n"),  # a body for the prompt's function
])
def test_extract_code(completion, code):
    assert C.extract_code(completion) == code


def test_pass_at_1_through_lm_eval(manager):
    """The whole lm-eval path (requests, generation, filters, metric) with a stand-in model that
    answers the first problems correctly and the last wrongly, as text and through a chat template."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM

    class Oracle(LM):
        def __init__(self, answers):
            super().__init__()
            self.answers, self.contexts = answers, []

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            self.contexts += [r.args[0] for r in requests]
            return [next(a for key, a in self.answers if key in r.args[0]) for r in requests]

        @property
        def tokenizer_name(self):
            return "oracle"

        def chat_template(self, chat_template=None):
            return "oracle"

        def apply_chat_template(self, history, add_generation_prompt=True):
            text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in history)
            if not add_generation_prompt:  # continue the final (assistant) message
                text = text[: -len(f"</{history[-1]['role']}>")]
            return text + ("<assistant>" if add_generation_prompt else "")

    task = manager.load(["humaneval"])["tasks"]["humaneval"]
    docs = [task.eval_docs[i]["doc"] for i in range(4)]
    answers = [(d["prompt"].strip(), d["canonical_solution"] if i < 3 else "    return None\n")
               for i, d in enumerate(docs)]
    for chat in (False, True):
        lm = Oracle(answers)
        result = simple_evaluate(model=lm, tasks=["humaneval"], task_manager=manager, limit=4,
                                 confirm_run_unsafe_code=True, apply_chat_template=chat)
        assert result["results"]["humaneval"]["pass@1,sandbox"] == pytest.approx(0.75)
        context = lm.contexts[0]
        assert context.endswith("passes corresponding tests:\n```python\n")
        assert ("<assistant>Below is a Python script" in context) == chat
