"""The float32 output head of vLLM's CPU build (vllm_haq/vllm/head.py): prompt-sized batches on CPUs without
AVX-512 BF16 multiply in float32 over chunks of vocabulary rows, and equal vLLM's bf16 head to bf16 rounding."""

import pytest
import torch

head = pytest.importorskip("vllm_haq.vllm.head")


def _layer(vocab, hidden, seed):
    layer = torch.nn.Module()
    g = torch.Generator().manual_seed(seed)
    layer.weight = torch.nn.Parameter((torch.randn(vocab, hidden, generator=g) * 0.05).bfloat16(),
                                      requires_grad=False)
    return layer


@pytest.mark.parametrize("tokens", [3, 16, 40])
def test_head_matches_the_bf16_head_and_takes_float32_for_prompts(tokens):
    method = head.Float32ChunkedHeadMethod()
    layer = _layer(head.CHUNK + 100, 64, tokens)  # a chunk boundary inside the vocabulary
    method.process_weights_after_loading(layer)  # vLLM's CPU dispatch (the path decode-sized batches keep)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    bias = torch.randn(head.CHUNK + 100).bfloat16()
    got = method.apply(layer, x, bias)
    exact = x.double() @ layer.weight.double().t() + bias.double()
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    # both round the float32 sum of the same products to bf16: at most one bf16 step (2^-8 relative) apart
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()
    fp32 = ((x.float() @ layer.weight.float().t()) + bias.float()).bfloat16()
    if tokens >= head.PREFILL_ROWS and head.needs_float32_head(torch.bfloat16):
        assert torch.equal(got, fp32)  # the float32 path, chunks and all, is the unchunked float32 product
    few = method.apply(layer, x[:2], None)  # decode-sized: vLLM's own path, the same rounding bound
    exact = x[:2].double() @ layer.weight.double().t()
    assert ((few.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()
