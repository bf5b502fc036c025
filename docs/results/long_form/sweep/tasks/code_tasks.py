"""Scoring for the HumanEval and MBPP task YAMLs: executed tests, pass@1.

lm-eval loads this file by path (`!function code_tasks.name` in humaneval.yaml / mbpp.yaml),
from the folder the rendered YAMLs are written to, so it is copied there beside them and must
import nothing relative to itself: only the installed gateskip.

Both tasks prompt in the EvalPlus style the Qwen2.5-Coder report evaluates instruct models
with: the user turn asks for a self-contained script in a markdown code block, and the answer
is started for the model (lm-eval's `gen_prefix`) with "...:\\n```python\\n", so a chat model
(`--apply_chat_template`) and a raw completion model both generate code from the first token,
and generation stops at the closing fence. The filter (`run_humaneval` / `run_mbpp`) builds
every program, runs them all in the sandbox at once (a few in parallel) and hands each
outcome on as the filtered response; `process_results` turns it into pass@1 (greedy, one
sample, so pass@1 is the fraction passed).
"""

from __future__ import annotations

import ast
import re
import textwrap

from gateskip.evaluation.sandbox import Outcome, run_programs

TIMEOUT_S = 10.0
MEMORY_MB = 1024

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def _parses(code: str) -> bool:
    try:
        ast.parse(textwrap.dedent(code))
    except (SyntaxError, ValueError):
        return False
    return True


def extract_code(completion: str) -> str:
    """The program text of a generation. The prompt opens a ```python block, so the code is
    what comes before the first fence; when that is empty or prose (it does not parse) and a
    fenced block follows (a model that answered "Here is the code: ```python ..."), that block;
    else the completion as it is."""
    head = completion.split("```", 1)[0]
    if head.strip() and (_parses(head) or "```" not in completion):
        return head
    block = _FENCE.search(completion)
    if block is not None:
        return block.group(1)
    return head if head.strip() else completion


def humaneval_program(doc: dict, completion: str) -> str:
    """The HumanEval program to run: the extracted code, then the problem's tests and a call of
    check(entry_point). A whole function (the code defines the entry point at column 0) follows
    the problem's prompt, which keeps the prompt's imports and helper functions and is
    redefined by it; anything else is taken as the function's body and appended to the prompt."""
    code = extract_code(completion)
    entry = doc["entry_point"]
    whole = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M) is not None
    head = doc["prompt"] + ("\n\n" if whole else "")
    return f"{head}{code}\n\n{doc['test']}\n\ncheck({entry})\n"


def mbpp_program(doc: dict, completion: str) -> str:
    """The MBPP program to run: the extracted code, the problem's setup code (which may use the
    solution's classes) and its three asserts (test_list; the challenge tests are not used, as
    in the original benchmark and EvalPlus's base tests)."""
    code = extract_code(completion)
    tests = "\n".join(doc["test_list"])
    return f"{code}\n\n{doc.get('test_setup_code') or ''}\n\n{tests}\n"


def _describe(outcome: Outcome) -> str:
    """ "passed", or the status and the last line of the error ("failed: AssertionError")."""
    lines = [line.strip() for line in outcome.detail.splitlines() if line.strip()]
    return f"{outcome.status}: {lines[-1]}" if lines and not outcome.passed else outcome.status


def _run(build, resps: list[list[str]], docs: list[dict], desc: str) -> list[list[str]]:
    programs = [build(doc, r) for resp, doc in zip(resps, docs) for r in resp]
    outcomes = iter(run_programs(programs, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, desc=desc))
    return [[_describe(next(outcomes)) for _ in resp] for resp in resps]


def run_humaneval(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval `custom` filter: each generation -> "passed" or "<status>: <last error line>"."""
    return _run(lambda doc, r: humaneval_program(doc["doc"], r), resps, docs, "humaneval tests")


def run_mbpp(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval `custom` filter: each generation -> "passed" or "<status>: <last error line>"."""
    return _run(lambda doc, r: mbpp_program(doc["doc"], r), resps, docs, "mbpp tests")


def _flatten(results) -> list[str]:
    if isinstance(results, str):
        return [results]
    return [s for item in results for s in _flatten(item)]


def process_results(doc: dict, results: list) -> dict[str, float]:
    """pass@1 of one problem from its filtered responses (the first sample's outcome)."""
    outcomes = _flatten(results)
    return {"pass@1": float(bool(outcomes) and outcomes[0] == "passed")}
