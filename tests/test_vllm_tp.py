"""Tensor parallelism through real vLLM (CPU build, two worker processes): tensor_parallel_size=2 with the
plugin gives TP=1's greedy tokens and prompt log-probabilities for a dense and an MoE model — the MoE at TP=2
with expert offloading on (one cache slot per layer), each rank caching its own shards of the experts.

Row-parallel linears and the experts' down projections read a shard of their input on each rank; they
quantize a token with the max over all shards (vllm_haq.vllm.tp), so the two ranks' int32 partial products add
up to TP=1's and only the float summation of vLLM's all-reduce differs.
"""

import pytest
import torch

from conftest import shutdown_llm

PROMPT_TOKENS, GEN_TOKENS = 40, 10


def _greedy_and_logprobs(ckpt: str, tp: int, haq: dict | None = None):
    """(greedy tokens, prompt logprobs, each rank's offload statistics or None)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_haq.vllm import offload_stats
    from vllm_haq.vllm.scoring import make_llm, prompt_token_logprobs

    windows = torch.randint(2, 500, (3, PROMPT_TOKENS), generator=torch.Generator().manual_seed(11))
    extra = {"additional_config": {"haq": haq}} if haq else {}
    llm = make_llm(ckpt, max_model_len=128, dtype="float32", enforce_eager=True, tensor_parallel_size=tp, **extra)
    try:
        logprobs = prompt_token_logprobs(llm, windows)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w[:12].tolist()) for w in windows],
                            SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], logprobs, offload_stats(llm)
    finally:
        shutdown_llm(llm)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_tensor_parallel_2_matches_tp_1(family, haq_dir, monkeypatch):
    # One OpenMP thread per rank, each on its own core (the CPU build's default binding needs more cores).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ckpt = haq_dir(family)
    offload = {"slots_per_layer": 1, "policy": "lru"} if family == "mixtral" else None
    tokens_1, logprobs_1, _ = _greedy_and_logprobs(ckpt, 1)
    tokens_2, logprobs_2, stats = _greedy_and_logprobs(ckpt, 2, offload)
    assert tokens_2 == tokens_1
    diff = (logprobs_2 - logprobs_1).abs()
    # float32 all-reduce order is the only difference: far below one int8 rounding step's effect
    assert float(diff.max()) < 1e-3, float(diff.max())
    if offload:
        assert len(stats) == 2
        for rank in stats:  # each rank served misses from its own one-slot-per-layer cache of its shards
            assert rank["misses"] > 0 and rank["fetches"] > 0 and rank["slots"] == rank["layers"]
            assert rank["device_cache_bytes"] == rank["slots"] * rank["expert_bytes"]
            assert rank["all_experts_bytes"] == rank["layers"] * rank["experts_per_layer"] * rank["expert_bytes"]
        assert stats[0]["expert_bytes"] == stats[1]["expert_bytes"]
