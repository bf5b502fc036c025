"""Why the compiled decode step does not pay on this CPU: one MLP of the bundled model (1 x 1 x 576) and a tiny
Linear(8, 8), eager vs through gateskip.inference.compiled.Compiled, 1 thread, alternating. Run from the repo root:
OMP_NUM_THREADS=1 .venv/bin/python experiments/speed/compile_overhead.py"""
import time, torch
torch.set_num_threads(1)
from gateskip.loading import load_model
from gateskip.core.execution import step_mlp, step_keys
from gateskip.inference.compiled import Compiled
m, _ = load_model("smollm2-135m")
layers = m.model.layers
x = torch.randn(1, 1, 576)
mlp_c = Compiled(step_mlp)
with torch.inference_mode():
    mlp_c(layers[0].mlp, x)
    for name, f in (("eager", step_mlp), ("compiled", mlp_c)) * 3:
        t = time.perf_counter()
        for _ in range(20):
            for l in layers:
                f(l.mlp, x)
        print(name, f"{(time.perf_counter() - t) / (20 * len(layers)) * 1e6:.0f} us per MLP call")
    small = torch.nn.Linear(8, 8)
    y = torch.randn(1, 8)
    lin_c = Compiled(step_mlp)
    lin_c(small, y)
    for name, f in (("eager", step_mlp), ("compiled", lin_c)) * 2:
        t = time.perf_counter()
        for _ in range(2000):
            f(small, y)
        print("tiny linear", name, f"{(time.perf_counter() - t) / 2000 * 1e6:.0f} us per call")
