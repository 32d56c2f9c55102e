"""The two computations DeepSeek-V2/V3 add to the reference forward: multi-head latent attention and grouped
top-k routing. Everything else of the family (norms, dense MLPs, experts, shared experts) is the common
forward of :mod:`offline.models.spec`, driven by the family's facts (:mod:`offline.models.families`).

Both follow transformers' DeepseekV2/V3 modules (``models/deepseek_v2/modeling_deepseek_v2.py``:
``DeepseekV2Attention``, ``DeepseekV2TopkRouter``) and what vLLM 0.32 computes for the same config
(``model_executor/models/deepseek_v2.py``; routing: ``layers/fused_moe/router/cpu_router.py:_grouped_topk``).
Options on which the two disagree are refused by the family's ``refused`` predicates instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import math

from offline.models.rope import rope_cos_sin, rope_parameters
from offline.models.tensors import LayerTensors, rms_norm

if TYPE_CHECKING:
    from offline.models.spec import ModelSpec


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved rotation's partner: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...). DeepSeek rotates
    adjacent pairs (transformers' complex ``apply_rotary_emb``; vLLM's rope with ``is_neox_style=False``)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def latent_attention(spec: ModelSpec, lt: LayerTensors, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's multi-head latent attention on float32 ``x`` [B, T, H] (causal, RoPE on the rope part only)."""
    la, c = spec.facts.latent, spec.config
    b, t, _ = x.shape
    nh, nope = int(c["num_attention_heads"]), int(c["qk_nope_head_dim"])
    rope, vd, rank = int(c["qk_rope_head_dim"]), int(c["v_head_dim"]), int(c["kv_lora_rank"])
    eps = spec._eps  # transformers' latent norms fix 1e-6; the family refuses other rms_norm_eps values
    if c.get("q_lora_rank"):
        q = lt.linear(la.q_b, rms_norm(lt.linear(la.q_a, x), lt[f"{la.q_a_norm}.weight"], eps))
    else:
        q = lt.linear(la.q, x)
    q_nope, q_pe = q.view(b, t, nh, nope + rope).transpose(1, 2).split([nope, rope], dim=-1)
    latent, k_pe = lt.linear(la.kv_a, x).split([rank, rope], dim=-1)
    kv = lt.linear(la.kv_b, rms_norm(latent, lt[f"{la.kv_a_norm}.weight"], eps))
    k_nope, v = kv.view(b, t, nh, nope + vd).transpose(1, 2).split([nope, vd], dim=-1)
    cos, sin = rope_cos_sin(c, t, rope, x.device, spec._rope_cache)
    cos, sin = (y[:, : rope // 2].repeat_interleave(2, dim=-1) for y in (cos, sin))  # one angle per pair
    q_pe = q_pe * cos + rotate_pairs(q_pe) * sin
    k_pe = k_pe.unsqueeze(1) * cos + rotate_pairs(k_pe.unsqueeze(1)) * sin  # one rope key shared by the heads
    q = torch.cat((q_nope, q_pe), dim=-1)
    k = torch.cat((k_nope, k_pe.expand(-1, nh, -1, -1)), dim=-1)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale(c, nope + rope))
    return lt.linear(la.o, a.transpose(1, 2).reshape(b, t, nh * vd))


def softmax_scale(config: dict, qk_head_dim: int) -> float:
    """1 / sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim) squared (transformers'
    ``yarn_apply_mscale``; vLLM ``models/deepseek_v2.py:1129-1136``). YaRN's own attention factor (mscale /
    mscale_all_dim) is in the cos/sin tables (:func:`offline.models.rope.rope_cos_sin`)."""
    params, scale = rope_parameters(config), qk_head_dim ** -0.5
    factor, m = float(params.get("factor") or 1.0), float(params.get("mscale_all_dim") or 0.0)
    if params["rope_type"] != "default" and m and factor > 1:
        scale *= (0.1 * m * math.log(factor) + 1.0) ** 2
    return scale


def grouped_topk(logits: torch.Tensor, top_k: int, config: dict, renormalize: bool,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing of router logits [M, E]: (weights float32 [M, k], expert ids [M, k]).

    Scores are softmax (V2) or sigmoid (``scoring_func``, V3) of the logits; the experts form ``n_group`` groups,
    and only the ``topk_group`` best groups (a group's score: its best expert, or with ``e_score_correction_bias``
    its two best biased scores) are eligible; the top-k eligible experts are chosen on the (biased) scores and
    weighted by their unbiased scores, renormalized if asked, times ``routed_scaling_factor``. This is
    vLLM's ``cpu_router.py:_grouped_topk`` (lines 26-79) step by step; transformers' ``greedy`` (one group) and
    ``group_limited_greedy`` are its bias-free cases. vLLM scales the routed experts' output by
    ``routed_scaling_factor`` after the MoE method instead of the weights (``fused_moe/layer.py:305-311``,
    ``runner/moe_runner.py:403-419``): the same sum."""
    logits = logits.float()
    scores = logits.sigmoid() if config.get("scoring_func", "softmax") == "sigmoid" else logits.softmax(dim=-1)
    m, e = scores.shape
    n_group, topk_group = int(config.get("n_group") or 1), int(config.get("topk_group") or 1)
    chosen = scores if bias is None else scores + bias.float().unsqueeze(0)
    grouped = chosen.view(m, n_group, e // n_group)
    group_scores = grouped.max(dim=-1).values if bias is None else grouped.topk(2, dim=-1).values.sum(dim=-1)
    groups = group_scores.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores).scatter_(1, groups, 1.0).bool()
    eligible = chosen.masked_fill(~mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = eligible.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * float(config.get("routed_scaling_factor", 1.0) or 1.0), ids
