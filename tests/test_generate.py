"""``offline.generate`` / ``haq generate``: greedy generation without vLLM on converted tiny MoE checkpoints.

The all-resident run must pick the argmax of the pure-PyTorch reference (``haq eval --backend hf``'s forward) at
every step, and every offloading policy with one slot per layer or half of the experts must give the all-resident
logits bit for bit (the project's claim for the offload engine on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from offline.perplexity import hf_final_hidden
from offline.generate import generate
from vllm_haq.format import CheckpointError
from vllm_haq.offload import OffloadConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [300, 12, 77, 3, 250, 8, 90]
NEW = 8

# The kernels' automatic CPU choice imports vLLM's compiled ops to test oneDNN (7-15 s here) and on this host's
# AVX2 CPU settles on "torch" anyway (oneDNN's int8 GEMM saturates); naming it keeps these tests vLLM-free.
ENV = {"HAQ_INT8_BACKEND": "torch"}

# rtn: the plain case; smoothquant per-expert: explicit per-expert input_smooth and Qwen2-MoE's shared expert;
# haq rotation=all: the experts' gate/up input and their down projections rotated (one block each per layer).
CHECKPOINTS = {
    "mixtral-rtn": ("mixtral", dict(method="rtn")),
    "qwen2_moe-per-expert": ("qwen2_moe", dict(method="smoothquant", moe_smoothing="per-expert")),
    "mixtral-rotated": ("mixtral", dict(method="haq", rotation="all")),
}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def ckpt(converted):
    """name -> converted checkpoint directory (session cache of conftest's ``converted``)."""
    return lambda name: converted(CHECKPOINTS[name][0], **CHECKPOINTS[name][1])


@pytest.fixture(scope="module")
def resident(ckpt):
    """name -> the all-resident GenerationResult (computed once)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = generate(ckpt(name), PROMPT, NEW)
        return cache[name]

    return get


def _explicit_and_rotated(model_dir: str) -> tuple[list, dict]:
    with open(os.path.join(model_dir, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    return qc["smoothing"].get("explicit") or [], {k: v for k, v in (qc.get("input_rotation") or {}).items()
                                                    if ".experts." in k}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_resident_greedy_is_the_reference_argmax(ckpt, resident, name):
    model_dir = ckpt(name)
    explicit, rotated = _explicit_and_rotated(model_dir)
    if name == "qwen2_moe-per-expert":
        assert explicit, "the conversion should carry explicit per-expert input_smooth"
    if name == "mixtral-rotated":
        assert any(k.endswith(".w1") for k in rotated) and any(k.endswith(".w2") for k in rotated), rotated
    got = resident(name)
    assert len(got.tokens) == NEW and got.logits.shape == (NEW, 512) and got.logits.dtype == torch.float32
    assert got.offload_stats is None
    # the reference: the whole prompt + generated sequence in one forward of offline.models' per-expert loop
    state = hf_final_hidden(model_dir, torch.tensor([PROMPT + got.tokens[:-1]]))
    ref = state.spec.head(state.globals, state.hidden)[0, len(PROMPT) - 1 :]
    assert ref.argmax(-1).tolist() == got.tokens
    # Not bit-identical: the served experts scale their exact int32 products in float32 (the runtime's GEMM), the
    # reference in float64, routes are summed in another order and each step's matmuls have other shapes. That is
    # a few float32 ulps of these logits (|logit| <= ~4; measured <= 2e-6); 1e-4 leaves room, and a flipped int8
    # rounding would move a logit by about 1e-2.
    torch.testing.assert_close(got.logits, ref, rtol=0, atol=1e-4)
    assert len(set(got.tokens)) > 1, "a constant continuation would prove little"


def test_dense_model_generates_the_reference_argmax_and_refuses_a_budget(haq_dir):
    model_dir = haq_dir("llama")
    got = generate(model_dir, PROMPT, 4)
    state = hf_final_hidden(model_dir, torch.tensor([PROMPT + got.tokens[:-1]]))
    ref = state.spec.head(state.globals, state.hidden)[0, len(PROMPT) - 1 :]
    assert ref.argmax(-1).tolist() == got.tokens and got.offload_stats is None
    torch.testing.assert_close(got.logits, ref, rtol=0, atol=1e-4)  # other matmul shapes per step (see above)
    with pytest.raises(ValueError, match="no MoE layers"):
        generate(model_dir, PROMPT, 1, offload={"slots_per_layer": 1})


BUDGETS = {"one slot": {"slots_per_layer": 1}, "half": {"expert_fraction": 0.5}}


# every policy and budget on the plain checkpoint; one slot per layer (cache and CPU paths) on the others
CASES = [(n, b, p) for n in CHECKPOINTS for b in BUDGETS for p in ("haq", "lru", "static")
         if n == "mixtral-rtn" or b == "one slot"]


@pytest.mark.parametrize("name,budget,policy", CASES)
def test_offloaded_equals_resident_bit_for_bit(ckpt, resident, name, budget, policy):
    want = resident(name)
    got = generate(ckpt(name), PROMPT, NEW, offload={**BUDGETS[budget], "policy": policy})
    assert got.tokens == want.tokens
    assert torch.equal(got.logits, want.logits), f"max diff {(got.logits - want.logits).abs().max()}"
    s = got.offload_stats
    experts = 16 if name.startswith("qwen2_moe") else 8
    assert s["started"] and s["policy"] == policy and s["layers"] == 2
    assert s["slots_per_layer"] == [1, 1] if budget == "one slot" else s["slots"] == experts
    assert s["steps"] == 2 * NEW and s["misses"] > 0 and s["fetches"] + s["cpu_experts"] == s["misses"], s
    if policy == "static":  # placed once, misses on the CPU
        assert s["fetches"] == 0 and s["cpu_expert_tokens"] >= s["misses"]
    if policy == "lru":  # every miss fetched
        assert s["fetches"] == s["misses"] and s["bytes_h2d"] > 0


def test_offload_dict_may_be_wrapped_like_additional_config(ckpt, resident):
    got = generate(ckpt("mixtral-rtn"), PROMPT, 3, offload={"haq": {"slots_per_layer": 0}})
    assert got.tokens == resident("mixtral-rtn").tokens[:3]
    assert got.offload_stats["fetches"] == 0 and got.offload_stats["cpu_experts"] == got.offload_stats["misses"] > 0


def test_cli_generates_and_prints_tokens_and_stats(ckpt, resident):
    from transformers import AutoTokenizer

    model_dir = ckpt("mixtral-rtn")
    prompt = "The quick brown fox"
    cmd = [sys.executable, "-m", "offline.cli", "generate", model_dir, "--prompt", prompt, "--max-new-tokens", "5",
           "--device", "cpu", "--offload", "slots_per_layer=1", "policy=lru"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[0].startswith(prompt)
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]
    assert result["tokens"] == generate(model_dir, ids, 5).tokens
    s = result["offload_stats"]
    assert s["policy"] == "lru" and s["slots_per_layer"] == [1, 1] and s["misses"] == s["fetches"] > 0


def test_bad_input_is_refused_naming_the_cause(ckpt, tiny_dir, capsys):
    from offline.cli import main

    model_dir = ckpt("mixtral-rtn")
    with pytest.raises(OffloadConfigError, match="bogus_key"):
        generate(model_dir, PROMPT, 1, offload={"bogus_key": 1})
    with pytest.raises(OffloadConfigError, match="slots_per_layer"):
        generate(model_dir, PROMPT, 1, offload={"slots_per_layer": 9})  # the tiny Mixtral has 8 experts
    with pytest.raises(OffloadConfigError, match="policy"):
        generate(model_dir, PROMPT, 1, offload={"slots_per_layer": 1, "policy": "fifo"})
    with pytest.raises(CheckpointError, match="no quantization_config"):
        generate(tiny_dir("mixtral"), PROMPT, 1)  # the unconverted model
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model_dir, [512], 1)
    with pytest.raises(ValueError, match="empty"):
        generate(model_dir, [], 1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            generate(model_dir, PROMPT, 1, device="cuda")
    with pytest.raises(ValueError, match="only auto, cpu and cuda"):
        generate(model_dir, PROMPT, 1, device="meta")

    for argv, words in (
        (["--offload", "bogus_key=1"], ["bogus_key"]),
        (["--offload", "slots_per_layer"], ["--offload", "KEY=VALUE"]),
        (["--device", "cuda:7"], ["cuda:7"]),
    ):
        assert main(["generate", model_dir, "--prompt", "x", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("haq generate: error:") and all(w in err for w in words), err
    assert main(["generate", tiny_dir("mixtral"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "not a converted checkpoint" in err, err
