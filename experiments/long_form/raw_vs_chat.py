"""Why did the main job's gated samples answer nothing? The shipped gates of the bundled
SmolLM2-135M-Instruct under their allocations, on the main job's three questions, as raw text
("Question: ...\nAnswer:") and through the chat template: the probability of the end-of-turn
token as the first answer token, and the greedy answer (24 tokens), at 0-20 % net saving. Then
two suspects of ours on the raw prompt that goes empty at 10 %: the first token (is it protected
from skipping; does a BOS in front help), and each module the 10 % allocation removes, restored
alone.

    .venv/bin/python experiments/long_form/raw_vs_chat.py | tee docs/results/long_form/raw_vs_chat.log
"""

import torch

from gateskip import load_gates, load_model
from gateskip.core.budget import AllocationBudget
from gateskip.demo.stages import QUESTIONS
from gateskip.inference.calibrate import allocation_budget
from gateskip.inference.generation import generate

TARGETS = (0.0, 0.05, 0.1, 0.2)

torch.manual_seed(0)
model, tok = load_model("smollm2-135m")
load_gates(model, "gates/smollm2-135m-unit")
end = tok.eos_token_id
kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=end, output_scores=True, return_dict_in_generate=True)
print(f"end-of-turn token {tok.convert_ids_to_tokens(end)!r} (id {end}); targets are net savings of the shipped allocations")
for question in QUESTIONS:
    raw = tok(f"Question: {question}\nAnswer:", return_tensors="pt")["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]
    print(f"\n## {question}")
    for name, ids in (("raw", raw), ("chat", chat)):
        for target in TARGETS:
            with torch.inference_mode():
                gen = generate(model, ids, budget=target, **kw)
            p_end = torch.softmax(gen.output.scores[0][0].float(), -1)[end].item()
            text = tok.decode(gen.sequences[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " / ")
            print(f"{name:4s} target {target:.2f}  p(end first) {p_end:.3f}  {text!r}")


def p_end(ids: torch.Tensor, budget) -> str:
    """p(end-of-turn) as the first answer token, and the greedy first token."""
    with torch.inference_mode():
        gen = generate(model, ids, budget=budget, **dict(kw, max_new_tokens=1))
    probs = torch.softmax(gen.output.scores[0][0].float(), -1)
    return f"{probs[end].item():.3f}, greedy first token {tok.convert_ids_to_tokens(int(probs.argmax()))!r}"


question = QUESTIONS[2]
raw = tok(f"Question: {question}\nAnswer:", return_tensors="pt")["input_ids"]
alloc = allocation_budget(model, 0.1, decoding=True)
print(f"\n## suspects, raw prompt {question!r} at 10 %")
print(f"skip_bos in the gate config: {model.gate_bank.config.skip_bos}")
print(f"as is                 p(end first) {p_end(raw, alloc)}")
bos = tok.bos_token_id if tok.bos_token_id is not None else end
print(f"BOS ({tok.convert_ids_to_tokens(bos)!r}) in front  p(end first) {p_end(torch.cat([torch.tensor([[bos]]), raw], 1), alloc)}")
for key in sorted((k for k, r in alloc.ratios.items() if r == 1.0), key=lambda k: (int(k.split(".")[1]), k)):
    restored = AllocationBudget({**alloc.ratios, key: 0.0}, alloc.target, alloc.thresholds)
    print(f"{key:7s} restored       p(end first) {p_end(raw, restored)}")
