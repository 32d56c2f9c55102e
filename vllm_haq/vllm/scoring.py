"""Scoring token windows through a vLLM engine (the served model, plugin included)."""

from __future__ import annotations

import os

import torch


def is_cpu_build() -> bool:
    """Whether this vLLM runs on the CPU (vLLM's CPU build): there torch.compile of a model takes minutes on a
    small host and saves less than that over a scoring run (SmolLM2-135M, 40 windows on 2 cores: 244 s
    compiled, 163 s eager; benchmarks/results/cpu_experts.md)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def make_llm(model_dir: str, max_model_len: int, **kwargs):
    """An ``LLM`` for scoring: HAQ checkpoints get ``quantization="haq"``; CPU-friendly defaults. ``model_dir``
    may be a Hugging Face id (vllm_haq.format.hub)."""
    from vllm import LLM

    from vllm_haq.format import config_dir, is_quantized_checkpoint

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    opts = dict(max_model_len=max_model_len, gpu_memory_utilization=0.3, seed=0)
    if is_quantized_checkpoint(config_dir(model_dir, kwargs.get("revision"), kwargs.get("download_dir"))):
        opts["quantization"] = "haq"
    opts.update(kwargs)
    return LLM(model=model_dir, **opts)


def prompt_token_logprobs(llm, windows: torch.Tensor, use_tqdm: bool = False) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1..T-1 of every window: float64 [n, T - 1] (``use_tqdm``: vLLM's
    progress bar over the windows, on stderr)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    result = torch.empty(windows.shape[0], windows.shape[1] - 1, dtype=torch.float64)
    for r, (out, w) in enumerate(zip(outs, windows.tolist())):
        for t in range(1, len(w)):
            result[r, t - 1] = out.prompt_logprobs[t][w[t]].logprob
    return result


def vllm_token_nll(model_dir: str, windows: torch.Tensor, use_tqdm: bool = False, **llm_kwargs) -> torch.Tensor:
    """Per-token NLL [n, T - 1] of ``windows`` under ``model_dir`` served by vLLM."""
    llm = make_llm(model_dir, max_model_len=windows.shape[1] + 1, **llm_kwargs)
    try:
        return -prompt_token_logprobs(llm, windows, use_tqdm=use_tqdm)
    finally:
        del llm
