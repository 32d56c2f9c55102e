"""Converted tiny models served by real vLLM with quantization="haq" vs the pure-torch int8 reference.

Tolerances (float32 activations, so only op order and rare per-token rounding
ties separate the two int8 implementations):
* prompt log-probabilities vs the reference applying the same int8 arithmetic
  to the same checkpoint: mean |Δ| ≤ 1e-3 nats, |Δ| ≤ 1e-3 at ≥ 95% of positions,
  max ≤ 0.15 (float op order — inductor fuses differently — can flip a per-token
  rounding of one int8 activation, which moves a few positions by up to ~0.05 in
  these deliberately sharp random models);
  Compiled cases allow mean ≤ 5e-3 and |Δ| ≤ 1e-3 at ≥ 75% of positions: on AVX-512 hosts inductor's
  code orders float ops (norms, rotary, softmax) differently, flips more per-token roundings, and a flip
  moves every later position of that sequence a little through attention (measured on llama: mean
  2.0e-3, 16% of positions above 1e-3, max 0.053) — the max bound and the greedy check stay strict;
  tests/test_families.py gives the same bounds to eager engines of checkpoints that flip a rounding there (the
  flipped token and the ~3e-7 input difference behind it are named in that module);
* mean |Δ| ≤ 0.05 nats vs the unquantized model (W8A8 stays close to bf16);
* greedy decoding: each generated token equals the reference's argmax wherever
  the reference's top-1 margin exceeds 0.05 nats.
"""

import pytest
import torch

from conftest import shutdown_llm
from offline.perplexity import hf_token_nll
from offline.models import LayerTensors, global_tensor_names, layer_rotations, spec_for
from offline.source import SafetensorsCheckpoint

CASES = [("opt", True), ("llama", False), ("mixtral", False), ("qwen2_moe", True)]  # (family, enforce_eager)


def reference_next_logits(model_dir: str, ids: list[int]) -> torch.Tensor:
    """Last-position logits of the pure-torch reference (int8 arithmetic for int8 tensors)."""
    import json
    import os

    config = json.load(open(os.path.join(model_dir, "config.json")))
    spec = spec_for(config)
    src = SafetensorsCheckpoint(model_dir)
    g = {n: src.get(n) for n in global_tensor_names(spec, src.names())}
    with torch.no_grad():
        h = spec.embed(g, torch.tensor([ids]))
        for i in range(spec.num_layers):
            prefix = spec.layer_prefix(i)
            tensors = LayerTensors(src.load_prefix(prefix), rotations=layer_rotations(config, prefix))
            h = spec.layer_forward(i, tensors, h)
        return spec.head(g, h)[0, -1]


@pytest.mark.parametrize("family,eager", CASES, ids=[f"{f}-{'eager' if e else 'compiled'}" for f, e in CASES])
def test_haq_through_vllm_matches_int8_reference(family, eager, tiny_dir, haq_dir):
    assert_served_matches_reference(haq_dir(family), tiny_dir(family), eager)


def assert_served_matches_reference(ckpt: str, unquantized: str, eager: bool, flips: bool = False) -> dict:
    """Serve ``ckpt`` with vLLM (float32) and check it against the int8 reference and the unquantized model
    ``unquantized`` within the module's tolerances; returns what was measured. ``flips``: the compiled cases'
    tolerances for an eager engine whose checkpoint is known to flip a per-token rounding (see the module
    docstring)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_haq.vllm.scoring import make_llm, prompt_token_logprobs

    torch.manual_seed(1234)
    windows = torch.randint(2, 500, (4, 64))
    llm = make_llm(ckpt, max_model_len=256, dtype="float32", enforce_eager=eager)
    try:
        served = prompt_token_logprobs(llm, windows)
        prompt = windows[0, :12].tolist()
        gen = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                           SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0].outputs[0].token_ids
    finally:
        shutdown_llm(llm)

    ref = -hf_token_nll(ckpt, windows).double()
    diff = (served - ref).abs()
    mean_tol, off_tol = (1e-3, 0.05) if eager and not flips else (5e-3, 0.25)
    assert float(diff.mean()) <= mean_tol, f"mean |Δlogprob| {float(diff.mean()):.2e}"
    assert float((diff > 1e-3).double().mean()) <= off_tol, f"{int((diff > 1e-3).sum())} positions off by > 1e-3"
    assert float(diff.max()) <= 0.15, f"max |Δlogprob| {float(diff.max()):.2e}"

    unquantized_lp = -hf_token_nll(unquantized, windows).double()
    drift = float((served - unquantized_lp).abs().mean())
    assert 0 < drift <= 0.05, f"W8A8 vs unquantized mean |Δlogprob| {drift:.3e}"

    checked = 0
    for step, token in enumerate(gen):
        logits = reference_next_logits(ckpt, prompt + list(gen[:step]))
        top2 = torch.topk(torch.log_softmax(logits, -1), 2)
        if float(top2.values[0] - top2.values[1]) > 0.05:
            assert token == int(top2.indices[0]), f"step {step}: vLLM {token}, reference {int(top2.indices[0])}"
            checked += 1
    assert checked >= 6, "too few clear-margin steps to check greedy decoding"
    return {"mean": float(diff.mean()), "max": float(diff.max()), "off": float((diff > 1e-3).double().mean()),
            "drift": drift, "greedy_checked": checked}
