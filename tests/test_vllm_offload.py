"""Expert offloading through real vLLM (CPU build: the "device" cache is a second host buffer).

For each budget and policy the served model must give the all-resident run's
greedy tokens and prompt log-probabilities (the engine computes every route with
the same int8 arithmetic and sums routes in a fixed order, so they agree to float
rounding of vLLM's own batching), with non-trivial statistics: misses when the
budget is below "all", none recorded during vLLM's warm-up.

Models: ../shared/models/tiny-mixtral (trained, real routing; 8 experts, top-2)
and a random Qwen2-MoE-style model (shared expert, 16 experts, top-4).
"""

import os

import pytest
import torch

from conftest import shared_path, shutdown_llm

PROMPT_TOKENS = 48
GEN_TOKENS = 12


def _run(ckpt: str, haq: dict | None, windows: torch.Tensor, concurrent_check: bool = False):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_haq.vllm import offload_stats
    from vllm_haq.vllm.scoring import make_llm, prompt_token_logprobs

    extra = {"additional_config": {"haq": haq}} if haq is not None else {}
    llm = make_llm(ckpt, max_model_len=256, dtype="float32", enforce_eager=True, **extra)
    try:
        before = offload_stats(llm)[0]
        logprobs = prompt_token_logprobs(llm, windows)
        params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=w[:16].tolist()) for w in windows]
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = None
        if concurrent_check:
            alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        after = offload_stats(llm)[0]
    finally:
        shutdown_llm(llm)
    return {"logprobs": logprobs, "tokens": together, "alone": alone, "before": before, "after": after}


def _check_same_as_resident(got: dict, resident: dict, haq: dict):
    assert got["tokens"] == resident["tokens"], f"{haq}: greedy tokens differ from the all-resident run"
    diff = (got["logprobs"] - resident["logprobs"]).abs().max().item()
    assert diff <= 1e-4, f"{haq}: prompt logprobs differ from the all-resident run by up to {diff}"
    before, after = got["before"], got["after"]
    # vLLM's warm-up and profiling passes are not counted
    assert before["steps"] == 0 and before["hits"] + before["misses"] == 0, before
    assert after["steps"] > 0 and after["policy"] == haq["policy"]
    assert after["misses"] > 0, after
    assert after["fetches"] + after["cpu_experts"] == after["misses"]
    return after


@pytest.fixture(scope="module")
def tiny_mixtral_haq(tmp_path_factory):
    from offline.convert import ConvertOptions, convert

    model = shared_path("models", "tiny-mixtral")
    calib = shared_path("data", "corpora", "wiki.train.txt")
    out = str(tmp_path_factory.mktemp("offload") / "tiny-mixtral-rtn")
    convert(model, out, ConvertOptions(method="rtn", calib=[calib], samples=8, seq_len=256))
    return out


@pytest.fixture(scope="module")
def mixtral_windows(tiny_mixtral_haq):
    from conftest import CORPORA
    from offline.perplexity import eval_token_windows

    return eval_token_windows(tiny_mixtral_haq, os.path.join(CORPORA, "sotu.test.txt"), PROMPT_TOKENS, 4)


@pytest.fixture(scope="module")
def mixtral_resident(tiny_mixtral_haq, mixtral_windows):
    out = _run(tiny_mixtral_haq, None, mixtral_windows)
    assert out["before"] is None and out["after"] is None  # no budget: no engine, experts resident
    return out


def _inject_copy_failures(monkeypatch, at=(40, 41, 90)) -> None:
    """Make the engine's expert copies fail at the given calls (the engine runs in this process: conftest)."""
    import vllm_haq.offload.engine as engine_module

    real_copy, calls = engine_module.copy_expert, []

    def sometimes_failing_copy(dst, slot, src, expert, non_blocking=False):
        calls.append(expert)
        if len(calls) in at:
            raise RuntimeError("injected copy failure")
        return real_copy(dst, slot, src, expert, non_blocking)

    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "the engine must run in this process"
    monkeypatch.setattr(engine_module, "copy_expert", sometimes_failing_copy)


MIXTRAL_CASES = [
    {"expert_fraction": 0.5, "policy": "haq", "prefetch": "always"},  # "auto" may skip tiny experts' prefetches
    {"slots_per_layer": 1, "policy": "lru"},
    {"slots_per_layer": 0, "policy": "static"},
]  # every budget x policy combination is checked bit for bit without vLLM in test_offload_engine.py


@pytest.mark.parametrize("haq", MIXTRAL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_tiny_mixtral_offloaded_equals_all_resident(haq, tiny_mixtral_haq, mixtral_windows, mixtral_resident,
                                                   monkeypatch):
    concurrent = haq["policy"] == "haq"
    faults = 3 if haq["policy"] == "lru" else 0
    if faults:
        # Copies fail now and then inside the serving engine: each failed expert is served from host memory
        # instead, requests see no error and the output stays the all-resident one.
        _inject_copy_failures(monkeypatch)
    got = _run(tiny_mixtral_haq, haq, mixtral_windows, concurrent_check=concurrent)
    s = _check_same_as_resident(got, mixtral_resident, haq)
    assert s["recovered_faults"] == faults, s
    if concurrent:  # requests batched together give what each gives alone
        assert got["alone"] == got["tokens"]
    if haq.get("slots_per_layer") == 0:
        assert s["hits"] == 0 and s["cpu_experts"] == s["misses"] and s["device_cache_bytes"] == 0
    if haq["policy"] == "lru":
        assert s["fetches"] == s["misses"] and s["bytes_h2d"] >= s["fetches"] * s["expert_bytes"]
    if haq["policy"] == "haq":
        assert s["slots"] == 6 * 8 // 2 and s["hits"] > 0
        assert s["prefetches"] > 0 and s["prefetch_accuracy"] is not None
        assert s["cost_model"]["h2d_bytes_per_s"] > 0 and s["cost_model"]["cpu_s_per_token"] > 0
    print(f"{haq}: {s}")


def test_qwen2_moe_offloaded_equals_all_resident(haq_dir):
    ckpt = haq_dir("qwen2_moe")
    torch.manual_seed(7)
    windows = torch.randint(2, 500, (3, PROMPT_TOKENS))
    resident = _run(ckpt, None, windows)
    for haq in ({"slots_per_layer": 1, "policy": "haq"}, {"expert_fraction": 0.25, "policy": "lru"}):
        s = _check_same_as_resident(_run(ckpt, haq, windows), resident, haq)
        assert s["experts_per_layer"] == 16
        print(f"qwen2_moe {haq}: {s}")


def test_offload_python_example(haq_dir):
    """examples/offload_python.py runs as documented and reports real offloading (misses, CPU or fetched experts)."""
    import json
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "offload_python.py")
    proc = subprocess.run([sys.executable, example, haq_dir("mixtral"), "--slots", "1", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    marker = "offload statistics (worker 0): "
    stats = json.loads(next(line for line in lines if line.startswith(marker))[len(marker):])
    assert len([line for line in lines if line.startswith("'") and " -> " in line]) == 2
    assert stats["misses"] > 0 and stats["fetches"] + stats["cpu_experts"] == stats["misses"], stats
