"""The unquantized output head on CPUs without native bf16: float32 GEMMs over row chunks of the weight.

HAQ keeps ``lm_head`` in the model's dtype. On vLLM's CPU build a bf16 head goes through oneDNN, whose bf16
matmul needs AVX-512 BF16/AMX: on AVX2-only hosts creating it fails and vLLM falls back to
``torch.nn.functional.linear`` in bf16 (vllm/model_executor/layers/utils.py, ``dispatch_cpu_unquantized_gemm``:
the ``create_onednn_mm`` try, then "Failed to create oneDNN linear, fallback to torch linear"), which runs at
a few GMAC/s. Scoring a prompt (``haq eval``: logits for every token of a 512-token window, vocab 49152 for
SmolLM2) then spends more time in the head than in all decoder layers. Here, from ``PREFILL_ROWS`` tokens on,
the head upcasts ``CHUNK`` vocabulary rows at a time and multiplies in float32 (MKL), writing the model's
dtype: the same products summed in float32 either way, no float32 copy of the weight kept, ~4x faster.
Decode-sized batches (fewer tokens) keep vLLM's path: there the upcast would cost more than it saves.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

PREFILL_ROWS = 16  # tokens from which the float32 path pays for its upcasts
CHUNK = 8192  # vocabulary rows upcast at a time (576 hidden: 19 MB of float32)


def needs_float32_head(dtype: torch.dtype) -> bool:
    """A bf16 head on a CPU whose oneDNN has no bf16 matmul (no AVX-512 BF16)."""
    return dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported()


class Float32ChunkedHeadMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized head, with the float32 path for prompt-sized batches (see the module doc)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = layer.weight
        if x.shape[0] < PREFILL_ROWS or not needs_float32_head(w.dtype):
            return super().apply(layer, x, bias)
        xf = x.float()
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        for r0 in range(0, w.shape[0], CHUNK):
            r1 = min(r0 + CHUNK, w.shape[0])
            y = xf @ w[r0:r1].float().t()
            if bias is not None:
                y += bias[r0:r1].float()
            out[:, r0:r1] = y
        return out
