"""Pure-PyTorch reference forward passes of the supported model families.

The converter runs models one decoder layer at a time (bounded memory), and the ``hf`` evaluation backend and
the tests need a forward pass that applies exactly HAQ's int8 arithmetic to a checkpoint's tensors. Both come
from here: every family is a set of architecture facts (:mod:`offline.models.families`: its linears, which
norm feeds which linears, where router and shared experts are) read by one :class:`ModelSpec`, whose float32
forward dispatches its linears on the stored tensors (:class:`LayerTensors`). Tests check these forwards
against ``transformers``.

Supported: OPT (pre-LayerNorm), Llama (incl. SmolLM2, Llama 3.x with every rope type transformers computes),
Mistral, Qwen2/Qwen2.5, Qwen3 (q/k-norm), Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (q/k-norm over the whole
projections), DeepSeek-V2 (latent attention and grouped routing: :mod:`offline.models.deepseek`).
"""

from __future__ import annotations

import math

import torch

from offline.models.families import FAMILIES, Family, MoEFacts
from offline.models.rope import UnsupportedModelError, rope_type
from offline.models.spec import ModelSpec, RoutingSink, SmoothGroup
from offline.models.tensors import LayerTensors, layer_rotations

__all__ = ["FAMILIES", "Family", "LayerTensors", "ModelSpec", "MoEFacts", "RoutingSink", "SmoothGroup",
           "UnsupportedModelError", "global_tensor_names", "layer_rotations", "log_softmax_nll",
           "perplexity", "spec_for"]


def spec_for(config: dict, source: str = "config.json") -> ModelSpec:
    """The ModelSpec for a Hugging Face config dict, or a clear UnsupportedModelError naming the option."""
    mtype = config.get("model_type")
    facts = FAMILIES.get(mtype)
    if facts is None:
        raise UnsupportedModelError(
            f"{source}: model_type {mtype!r} (architectures {config.get('architectures')}) is not supported; "
            f"supported: {sorted(FAMILIES)}"
        )
    for what, present in facts.refused:
        if present(config):
            raise UnsupportedModelError(f"{source}: {what} is not supported")
    act = config.get(facts.activation_key, facts.activation)
    if act != facts.activation:
        raise UnsupportedModelError(f"{source}: {facts.activation_key} {act!r} is not supported "
                                    f"(only {facts.activation})")
    if facts.rope:
        rope_type(config, source)  # validates the rope type early
    return ModelSpec(mtype, config)


def global_tensor_names(spec: ModelSpec, names: list[str]) -> list[str]:
    """Tensors outside the decoder layers (embeddings, final norm, LM head)."""
    return [n for n in names if not n.startswith(spec.facts.layer_root)]


def log_softmax_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``ids[:, 1:]`` under ``logits[:, :-1]``."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)
