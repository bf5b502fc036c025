"""The model's own chat-format code answers, as gate training and calibration text that looks like
what HumanEval and MBPP make it write, built from no evaluation item.

Each prompt is a function stub from the Python standard library's source (its signature and the
first paragraph of its docstring), from the code text's training side for the training answers
and from its held-out side for the held-out answers, put to Qwen2.5-Coder-0.5B-Instruct in the
same words as the bundled HumanEval task (its chat template, the answer started inside a
```python block). The base model answers greedily in a stock eager vLLM engine (bf16); each row is
the whole rendered conversation (prompt, answer, closing fence, end of turn), so gates trained or
calibrated on it see the chat format that generation decodes. tests/test_corpus.py checks both
files against every evaluation task's items.

    .venv/bin/python experiments/long_form/self_answers.py docs/results/long_form/self_answers
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import time
from pathlib import Path

MODEL = "qwen2.5-coder-0.5b"
# the bundled HumanEval task's words (src/gateskip/tasks/humaneval.yaml), around a stdlib stub
ASK = "Please provide a self-contained Python script that solves the following problem in a markdown code block:\n```\n{stub}\n```\n"
PREFIX = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:\n```python\n"
STUB = re.compile(r'^( *)def ([A-Za-z]\w*)\(([^)]*)\)[^:\n]*:\n\s+[rRuU]?"""(.*?)"""', re.S | re.M)


def stubs(texts: list[str]) -> list[str]:
    """`def name(args):` with the first paragraph of its docstring, for every function in `texts`
    whose docstring says something (six words or more); `self` dropped, duplicates once."""
    seen, out = set(), []
    for text in texts:
        for m in STUB.finditer(text):
            doc = " ".join(m.group(4).strip().split("\n\n")[0].split())
            args = ", ".join(a.strip() for a in m.group(3).split(",") if a.strip() not in ("self", "cls", ""))
            stub = f'def {m.group(2)}({args}):\n    """{doc}"""'
            if len(doc.split()) >= 6 and stub not in seen:
                seen.add(stub)
                out.append(stub)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=360, help="training answers (a seeded sample of the stubs)")
    p.add_argument("--max-tokens", type=int, default=384)
    args = p.parse_args()
    done = [args.out / f"{side}.jsonl.gz" for side in ("train", "heldout") if (args.out / f"{side}.jsonl.gz").exists()]
    if done:  # committed text others were trained on: never rewritten by a rerun
        raise SystemExit(f"error: {done[0]} exists; choose another output folder")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from gateskip.data import corpus
    from gateskip.loading import resolve_spec

    train, heldout = corpus.split_documents(seed=0, sources=corpus.CODE_SOURCES)
    sides = {"train": stubs([r["text"] for r in train]), "heldout": stubs([r["text"] for r in heldout])}
    sides["train"] = random.Random(0).sample(sides["train"], min(args.train, len(sides["train"])))
    folder = resolve_spec(MODEL)
    tok = AutoTokenizer.from_pretrained(folder)
    llm = LLM(model=str(folder), dtype="bfloat16", enforce_eager=True, max_model_len=2048, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=["\n```"])
    args.out.mkdir(parents=True, exist_ok=True)
    for side, side_stubs in sides.items():
        prompts = [tok.apply_chat_template([{"role": "user", "content": ASK.format(stub=s)}], tokenize=False,
                                           add_generation_prompt=True) + PREFIX for s in side_stubs]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        rows = [{"text": prompt + o.outputs[0].text + "\n```<|im_end|>\n", "source": "self_answers"}
                for prompt, o in zip(prompts, outs)]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        tmp = args.out / f".{side}.jsonl.gz.tmp"
        with gzip.open(tmp, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        tmp.replace(args.out / f"{side}.jsonl.gz")
        print(f"{side}: {len(rows)} answers, {tokens} answer tokens in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
