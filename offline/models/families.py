"""Architecture facts of every supported family, as data.

Why data: the converter (which linears to quantize, which smoothing folds are exact), the reference forward and
the dry-run estimate all read the same facts, so a new family is one entry here (plus, where its computation
is new, one piece of the forward) instead of ``family ==`` branches spread over files. Names are relative to a
decoder layer's prefix.

Folds (:meth:`offline.models.spec.ModelSpec.smoothing_groups`): input-side smoothing divides a norm's weight
(``attn_norm`` -> q/k/v, ``mlp_norm`` -> the MLP's input linears) and multiplies the consumers' input columns;
output-side smoothing divides a producer linear's output rows (v_proj -> o_proj, up_proj -> down_proj,
fc1 -> fc2). A producer whose output passes through something that is not linear per channel before its
consumer (q/k-norm: an RMSNorm over each head, or over the whole projection, sits between q_proj/k_proj and
attention) must never be an output-side producer: ``no_output_folds`` names them, and the spec refuses a group
that would fold into one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re
from typing import Callable

from offline.models.rope import rope_parameters


@dataclass(frozen=True)
class MoEFacts:
    """Where a family's MoE block is and how it routes.

    ``listed``: the expert linears in the order the converter lists them (Mixtral's historic w1, w2, w3; it
    fixes the tensor order of existing outputs). ``layers``: ``all`` (every decoder layer), or ``sparse_step``
    (``decoder_sparse_step`` and ``mlp_only_layers``, as Qwen2-MoE/Qwen3-MoE) or ``dense_first`` (layers from
    ``first_k_dense_replace`` on, DeepSeek). ``renormalize``: True, or the
    config key saying whether the top-k weights are renormalized (default False)."""

    block: str
    linears: tuple[str, str, str]  # each expert's (gate, up, down)
    listed: tuple[str, ...]
    experts_keys: tuple[str, ...]  # config keys giving the number of routed experts, first present wins
    layers: str = "all"
    router: str = "gate"
    renormalize: bool | str = True
    shared_expert: str | None = None  # block-relative module of the always-on expert
    shared_gate: str | None = None  # its sigmoid gate (an unquantized linear, like the router)
    shared_size_key: str | None = None  # config key: the shared expert exists when it is > 0
    # how the router's logits become top-k weights: "softmax" (softmax, top-k, maybe renormalized) or "grouped"
    # (DeepSeek: softmax or sigmoid scores, group-limited top-k, correction bias, routed_scaling_factor;
    # offline.models.deepseek.grouped_topk)
    routing: str = "softmax"


@dataclass(frozen=True)
class LatentAttention:
    """DeepSeek-V2/V3's multi-head latent attention (MLA), by layer-relative module name.

    q comes from ``q_proj`` (no ``q_lora_rank``, V2-Lite) or ``q_b_proj(q_a_layernorm(q_a_proj(x)))``; keys and
    values from one latent: ``kv_a_proj_with_mqa(x)`` = [kv_lora_rank latent | qk_rope_head_dim shared rope key],
    the latent normalized by ``kv_a_layernorm`` and expanded per head by ``kv_b_proj`` into [nope key | value].
    ``kv_b`` stays float: vLLM's MLA (model_executor/layers/attention/mla_attention.py:416) folds it into the
    attention as a dequantized matrix (decode never runs it as a linear), so W8A8 there would not be what vLLM
    computes. The two latent norms sit between their producer and consumer: only input-side folds into them."""

    q: str = "self_attn.q_proj"
    q_a: str = "self_attn.q_a_proj"
    q_a_norm: str = "self_attn.q_a_layernorm"
    q_b: str = "self_attn.q_b_proj"
    kv_a: str = "self_attn.kv_a_proj_with_mqa"
    kv_a_norm: str = "self_attn.kv_a_layernorm"
    kv_b: str = "self_attn.kv_b_proj"
    o: str = "self_attn.o_proj"


@dataclass(frozen=True)
class Family:
    """One architecture. ``norm``: ``rms`` (RMSNorm, ``rms_norm_eps``) or ``layer`` (LayerNorm with bias,
    eps 1e-5). ``mlp``: ``swiglu`` (``mlp_linears`` = gate, up, down) or ``relu`` (= fc1, fc2). ``rope``:
    rotary positions (through :mod:`offline.models.rope`), else learned positions ``embed_positions`` (offset 2,
    OPT). ``qk_norm``: the RMSNorms of q and k before RoPE, over each head (``qk_norm_over`` ``head``, Qwen3) or
    over the whole q_proj/k_proj output (``projection``, OLMoE: q's is num_heads x head_dim wide). ``sliding``:
    how a layer's sliding window is found (``all``: ``sliding_window`` on every layer, Mistral; ``layer_types``:
    Qwen2/Qwen3's ``use_sliding_window`` / ``max_window_layers`` / ``layer_types``; None: never).
    ``vo_heads``: the v_proj -> o_proj fold repeats factors over the query heads of a kv head (grouped-query
    attention)."""

    name: str
    layer_root: str = "model.layers."
    embed: str = "model.embed_tokens.weight"
    embed_positions: str | None = None
    final_norm: str = "model.norm"
    norm: str = "rms"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_linears: tuple[str, str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj")
    mlp: str = "swiglu"
    mlp_linears: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    rope: bool = True
    qk_norm: tuple[str, str] | None = None
    qk_norm_over: str = "head"
    sliding: str | None = None
    vo_heads: bool = True
    tie_default: bool = False
    moe: MoEFacts | None = None
    latent: LatentAttention | None = None  # DeepSeek's latent attention instead of q/k/v/o (attn_linears unused)
    activation_key: str = "hidden_act"
    activation: str = "silu"
    # (what is not supported, predicate on config.json that is True when the checkpoint has it)
    refused: tuple[tuple[str, Callable[[dict], bool]], ...] = field(default_factory=tuple)

    @property
    def no_output_folds(self) -> tuple[str, ...]:
        """Linears whose output may not absorb smoothing factors: q/k-norm normalizes q_proj/k_proj's output (per
        head or as a whole), so x / s there would not come out of the norm as x / s."""
        if self.latent:
            return self.latent.q_a, self.latent.kv_a
        return tuple(self.attn_linears[:2]) if self.qk_norm else ()

    @property
    def kept_float(self) -> tuple[str, ...]:
        """``quantization_config.ignore`` patterns of linears this family always keeps float (added to --ignore)."""
        return (rf"re:.*{re.escape(self.latent.kv_b)}$",) if self.latent else ()


_OPT = Family(
    "opt", layer_root="model.decoder.layers.", embed="model.decoder.embed_tokens.weight",
    embed_positions="model.decoder.embed_positions.weight", final_norm="model.decoder.final_layer_norm",
    norm="layer", attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
    attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    mlp="relu", mlp_linears=("fc1", "fc2"), rope=False, vo_heads=False, tie_default=True,
    activation_key="activation_function", activation="relu",
    refused=(("OPT with post-LayerNorm (do_layer_norm_before=false)",
              lambda c: not c.get("do_layer_norm_before", True)),
             ("OPT with project_in/out (word_embed_proj_dim != hidden_size)",
              lambda c: c.get("word_embed_proj_dim", c["hidden_size"]) != c["hidden_size"])),
)

_GUD = ("gate_proj", "up_proj", "down_proj")
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")
# OLMoE: what vLLM's OLMoE model would silently compute otherwise is refused (it clamps nothing, has no attention
# biases, never renormalizes the top-k weights, uses eps 1e-5 and head_dim = hidden_size / num_attention_heads).
_OLMOE_REFUSED = (
    ("OLMoE with clip_qkv (q/k/v clamping: vLLM's OLMoE does not clamp)", lambda c: c.get("clip_qkv") is not None),
    ("OLMoE with attention_bias=true (vLLM's OLMoE has no attention biases)", lambda c: bool(c.get("attention_bias"))),
    ("OLMoE with norm_topk_prob=true (vLLM's OLMoE does not renormalize the top-k weights)",
     lambda c: bool(c.get("norm_topk_prob"))),
    ("OLMoE with rms_norm_eps != 1e-5 (vLLM's OLMoE fixes 1e-5)", lambda c: c.get("rms_norm_eps", 1e-5) != 1e-5),
    ("OLMoE with head_dim != hidden_size / num_attention_heads",
     lambda c: c.get("head_dim") not in (None, c["hidden_size"] // c["num_attention_heads"])),
)
_QWEN_SHARED = dict(shared_expert="shared_expert", shared_gate="shared_expert_gate",
                    shared_size_key="shared_expert_intermediate_size")

# DeepSeek-V2: what transformers' DeepseekV2 and vLLM's deepseek_v2.py would compute differently is refused.
_DS_V2_REFUSED = (
    ("DeepSeek-V2 without n_group/topk_group (vLLM's DeepSeek always routes by groups and needs both)",
     lambda c: not c.get("n_group") or not c.get("topk_group")),
    ("DeepSeek-V2 with a topk_method other than greedy / group_limited_greedy",
     lambda c: c.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy")),
    ("DeepSeek-V2 with topk_method greedy and topk_group < n_group (vLLM limits greedy routing to the groups)",
     lambda c: c.get("topk_method", "greedy") == "greedy" and (c.get("topk_group") or 1) < (c.get("n_group") or 1)),
    ("DeepSeek-V2 with norm_topk_prob=true (transformers' DeepseekV2 ignores it, vLLM renormalizes)",
     lambda c: bool(c.get("norm_topk_prob"))),
    ("DeepSeek-V2 with scoring_func other than softmax", lambda c: c.get("scoring_func", "softmax") != "softmax"),
)
# DeepSeek-V3: transformers' DeepseekV3 always routes by sigmoid scores with e_score_correction_bias; vLLM does so
# only when the config says scoring_func sigmoid and topk_method noaux_tc (else softmax, no bias), and always
# rotates interleaved pairs (transformers' rope_interleave=false rotates halves).
_DS_V3_REFUSED = (
    ("DeepSeek-V3 without scoring_func sigmoid and topk_method noaux_tc (vLLM would route by softmax without the "
     "correction bias, transformers' DeepseekV3 by sigmoid with it)",
     lambda c: c.get("scoring_func") != "sigmoid" or c.get("topk_method") != "noaux_tc"),
    ("DeepSeek-V3 with rope_interleave=false (vLLM's DeepSeek always rotates interleaved pairs)",
     lambda c: c.get("rope_interleave", True) is False),
    ("DeepSeek-V3 without n_group/topk_group", lambda c: not c.get("n_group") or not c.get("topk_group")),
)
# Both versions: vLLM's latent norms use rms_norm_eps where transformers fixes 1e-6; vLLM places MoE layers by
# moe_layer_freq, transformers does not; vLLM's MLA has no biases; vLLM computes every scaled RoPE as its
# deepseek_yarn, whose scaling equals transformers' yarn only with both mscales and no attention_factor.
_DS_REFUSED = (
    ("DeepSeek with rms_norm_eps != 1e-6 (transformers' latent norms fix 1e-6, vLLM's use rms_norm_eps)",
     lambda c: c.get("rms_norm_eps", 1e-6) != 1e-6),
    ("DeepSeek with moe_layer_freq != 1 (transformers ignores it, vLLM does not)",
     lambda c: c.get("moe_layer_freq", 1) != 1),
    ("DeepSeek with attention_bias=true or mlp_bias=true (vLLM's DeepSeek has no biases)",
     lambda c: bool(c.get("attention_bias")) or bool(c.get("mlp_bias"))),
    ("DeepSeek with num_key_value_heads != num_attention_heads",
     lambda c: c.get("num_key_value_heads", c["num_attention_heads"]) != c["num_attention_heads"]),
    ("DeepSeek with a rope type other than default and yarn (vLLM's DeepSeek computes every other one as yarn)",
     lambda c: rope_parameters(c)["rope_type"] not in ("default", "yarn")),
    ("DeepSeek with yarn RoPE without both mscale and mscale_all_dim, or with attention_factor or truncate=false "
     "(vLLM's deepseek_yarn and transformers' yarn scale differently then)",
     lambda c: rope_parameters(c)["rope_type"] == "yarn" and (
         not rope_parameters(c).get("mscale") or not rope_parameters(c).get("mscale_all_dim")
         or "attention_factor" in rope_parameters(c) or rope_parameters(c).get("truncate", True) is False)),
)
_DS_MOE = MoEFacts("mlp", _GUD, _GUD, ("n_routed_experts",),
                   layers="dense_first", renormalize="norm_topk_prob", shared_expert="shared_experts",
                   shared_size_key="n_shared_experts", routing="grouped")

FAMILIES: dict[str, Family] = {
    "opt": _OPT,
    "llama": Family("llama"),
    "mistral": Family("mistral", sliding="all"),
    "qwen2": Family("qwen2", sliding="layer_types"),
    "qwen3": Family("qwen3", sliding="layer_types", qk_norm=_QK_NORM),
    "mixtral": Family("mixtral", moe=MoEFacts("block_sparse_moe", ("w1", "w3", "w2"), ("w1", "w2", "w3"),
                                              ("num_local_experts", "num_experts"))),
    "qwen2_moe": Family("qwen2_moe", moe=MoEFacts(
        "mlp", ("gate_proj", "up_proj", "down_proj"), ("gate_proj", "up_proj", "down_proj"),
        ("num_local_experts", "num_experts"), layers="sparse_step", renormalize="norm_topk_prob", **_QWEN_SHARED)),
    # transformers 5 writes num_local_experts; the Hub's Qwen3-MoE configs say num_experts
    "qwen3_moe": Family("qwen3_moe", sliding="layer_types", qk_norm=_QK_NORM,
                        moe=MoEFacts("mlp", _GUD, _GUD, ("num_local_experts", "num_experts"), layers="sparse_step",
                                     renormalize="norm_topk_prob")),
    # OLMoE: q/k-norm over the whole projections, every layer MoE (num_experts; no shared expert), the top-k
    # weights as the softmax gives them
    "olmoe": Family("olmoe", qk_norm=_QK_NORM, qk_norm_over="projection", refused=_OLMOE_REFUSED,
                    moe=MoEFacts("mlp", _GUD, _GUD, ("num_local_experts", "num_experts"), renormalize=False)),
    # DeepSeek-V2 / V2-Lite: latent attention, first_k_dense_replace dense layers then MoE layers of n_routed_experts
    # (softmax, greedy or group-limited top-k, routed_scaling_factor) plus always-on shared experts (no gate)
    "deepseek_v2": Family("deepseek_v2", latent=LatentAttention(), moe=_DS_MOE,
                          refused=_DS_V2_REFUSED + _DS_REFUSED),
    # DeepSeek-V3: the same layout; sigmoid scores, e_score_correction_bias (mlp.gate's), renormalized top-k
    "deepseek_v3": Family("deepseek_v3", latent=LatentAttention(), moe=_DS_MOE, refused=_DS_V3_REFUSED + _DS_REFUSED),
}
