"""Does the gated vLLM engine give the same tokens and skip counts under tensor parallelism?

    VLLM_CPU_OMP_THREADS_BIND="0|1|0" python experiments/serving/vllm_tensor_parallel_cpu.py 3

Runs the bundled SmolLM2-135M (9 query heads: TP 1 or 3) with the shipped gates at a net saving of
15 %, on vLLM's CPU build, over CPU processes (each tensor-parallel rank a process; on a 2-core
machine vLLM needs the binding above). Prints the greedy tokens of two prompts and every rank's
skip report; compare the output of TP 1 with TP 3. Results: docs/results/serving/vllm/tensor-parallel-cpu.log.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    from gateskip.serving import gated_llm

    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    llm = gated_llm("smollm2-135m", "gates/smollm2-135m-unit", 0.15, dtype="float32", max_model_len=512,
                    tensor_parallel_size=tp)
    outs = llm.generate(["The capital of France is", "def add(a, b):"],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    print(f"TP {tp} tokens:", [list(o.outputs[0].token_ids) for o in outs])
    reports = llm.collective_rpc("gateskip_report")
    for rank, report in enumerate(reports):
        print(f"TP {tp} rank {rank}: {report['tokens']} tokens, skip fraction {report['skip_fraction']:.6f}, "
              f"net saving {report['net_saving']:.6f}")
    print(f"TP {tp}: every rank's per-module counts equal rank 0's:", all(r == reports[0] for r in reports))
