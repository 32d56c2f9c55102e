"""``ModelSpec``: one checkpoint's names, quantization targets, exact smoothing folds and float32 forward,
all derived from its family's facts (:mod:`offline.models.families`) and its config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from offline.models.deepseek import grouped_topk, latent_attention
from offline.models.families import FAMILIES, Family, MoEFacts
from offline.models.rope import rope_cos_sin, rope_theta, rotate_half
from offline.models.tensors import LayerTensors, layer_norm, rms_norm, sliding_causal_mask, swiglu

RoutingSink = Callable[[int, torch.Tensor], None]


@dataclass
class SmoothGroup:
    """Linears fed by one producer, whose input channels can share smoothing factors s.

    The producer is a norm (``norm``: its weight/bias are divided by s) or a linear
    (``producer``: its output rows are divided by s). ``observed`` is the module
    whose input statistics define s (default: the first consumer); ``also_scaled``
    are unquantized consumers (MoE routers) whose weights absorb s to stay exact.
    ``heads`` = (kv heads, query heads per kv head, head dim) when the producer is
    v_proj under grouped-query attention: s must repeat across a kv head's query heads.
    """

    consumers: list[str]
    norm: str | None = None
    producer: str | None = None
    observed: str | None = None
    also_scaled: list[str] = field(default_factory=list)
    heads: tuple[int, int, int] | None = None
    experts: list[str] = field(default_factory=list)  # MoE: each expert's first input linear (w1/gate_proj)

    @property
    def observed_module(self) -> str:
        return self.observed or self.consumers[0]


@dataclass
class ModelSpec:
    """Family-specific names and forward pieces for one Hugging Face config."""

    family: str
    config: dict
    _rope_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def facts(self) -> Family:
        return FAMILIES[self.family]

    # ------------------------------------------------------------------ naming
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def layer_prefix(self, i: int) -> str:
        return f"{self.facts.layer_root}{i}."

    def is_moe_layer(self, i: int) -> bool:
        moe = self.facts.moe
        if moe is None:
            return False
        if moe.layers == "all":
            return True
        c = self.config
        if moe.layers == "dense_first":  # DeepSeek (moe_layer_freq other than 1 is refused)
            return self.num_experts > 0 and i >= int(c.get("first_k_dense_replace") or 0)
        step = int(c.get("decoder_sparse_step", 1) or 1)
        return self.num_experts > 0 and i not in (c.get("mlp_only_layers") or []) and (i + 1) % step == 0

    def moe_block(self, i: int) -> tuple[str, tuple[str, str, str]] | None:
        """(block name, (gate, up, down) linear names of each expert) if layer ``i`` is an MoE layer."""
        if not self.is_moe_layer(i):
            return None
        return self.facts.moe.block, self.facts.moe.linears

    def adds_to_output(self, i: int, module: str) -> bool:
        """Whether linear ``module``'s output is only added into layer ``i``'s output (the MLP's down projection,
        every expert's and the shared expert's), so a pass that keeps only the linears' inputs need not compute it
        (``LayerTensors.inputs_only``)."""
        moe = self.moe_block(i)
        if moe is None:
            return module == self.facts.mlp_linears[-1]
        block, (_gate, _up, down) = moe
        return module.startswith(f"{block}.") and module.rpartition(".")[2] == down

    @property
    def num_experts(self) -> int:
        keys = self.facts.moe.experts_keys if self.facts.moe else ("num_local_experts", "num_experts")
        return int(next((self.config[k] for k in keys if self.config.get(k)), 0))

    @property
    def top_k(self) -> int:
        return int(self.config.get("num_experts_per_tok", 0))

    def _shared_expert(self) -> str | None:
        """The block-relative name of the always-on expert, if this checkpoint has one."""
        moe = self.facts.moe
        if moe is None or moe.shared_expert is None or not self.config.get(moe.shared_size_key, 0):
            return None
        return moe.shared_expert

    @property
    def attention_linears(self) -> list[str]:
        """The attention's quantization targets: q/k/v/o, or the latent attention's (its kv_b_proj stays float)."""
        la = self.facts.latent
        if la is None:
            return list(self.facts.attn_linears)
        return ([la.q_a, la.kv_a, la.q_b] if self.config.get("q_lora_rank") else [la.q, la.kv_a]) + [la.o]

    def linear_modules(self, i: int) -> list[str]:
        """Quantization targets of layer ``i``, relative to its prefix."""
        names = self.attention_linears
        if not self.is_moe_layer(i):
            return names + list(self.facts.mlp_linears)
        moe = self.facts.moe
        names += [f"{moe.block}.experts.{e}.{w}" for e in range(self.num_experts) for w in moe.listed]
        shared = self._shared_expert()
        if shared:
            names += [f"{moe.block}.{shared}.{p}" for p in moe.linears]
        return names

    def smoothing_groups(self, i: int) -> list[SmoothGroup]:
        """Where activation smoothing of layer ``i`` can be folded exactly into the producer."""
        f = self.facts
        groups = self._attention_groups()
        if self.is_moe_layer(i):
            groups += self._moe_groups(f.moe)
        elif f.mlp == "relu":  # relu(x / s) = relu(x) / s for s > 0, so fc1's rows can absorb fc2's factors
            fc1, fc2 = f.mlp_linears
            groups += [SmoothGroup([fc1], norm=f.mlp_norm), SmoothGroup([fc2], producer=fc1)]
        else:
            gate, up, down = f.mlp_linears
            groups += [SmoothGroup([gate, up], norm=f.mlp_norm), SmoothGroup([down], producer=up)]
        bad = [g.producer for g in groups if g.producer in f.no_output_folds]
        if bad:
            raise AssertionError(f"{self.family}: a smoothing fold into {bad}'s output would not be exact (q/k-norm)")
        return groups

    def _attention_groups(self) -> list[SmoothGroup]:
        """attn_norm -> q/k/v and v_proj -> o_proj; latent attention: attn_norm -> q_a (or q) and kv_a, and
        q_a_layernorm -> q_b. o_proj is quantized unsmoothed: its only producer is kv_b_proj's value rows (attention
        is linear in the values), which stay in the source's bf16 as vLLM reads them; folding factors there would
        re-round them, and on the tiny test models it gained nothing and made o_proj's int8 input flip-prone."""
        f, c = self.facts, self.config
        la = f.latent
        if la is not None:
            if c.get("q_lora_rank"):
                return [SmoothGroup([la.q_a, la.kv_a], norm=f.attn_norm), SmoothGroup([la.q_b], norm=la.q_a_norm)]
            return [SmoothGroup([la.q, la.kv_a], norm=f.attn_norm)]
        q, k, v, o = f.attn_linears
        heads = None
        if f.vo_heads:
            nh = int(c["num_attention_heads"])
            nkv = int(c.get("num_key_value_heads") or nh)
            heads = (nkv, nh // nkv, self.head_dim)
        return [SmoothGroup([q, k, v], norm=f.attn_norm), SmoothGroup([o], producer=v, heads=heads)]

    def _moe_groups(self, moe: MoEFacts) -> list[SmoothGroup]:
        """The MoE input (all experts' and the shared expert's gate/up, the router and shared gate scaled
        alongside) and each expert's up -> down fold."""
        gate, up, _down = moe.linears
        experts = [f"{moe.block}.experts.{e}" for e in range(self.num_experts)]
        shared = self._shared_expert()
        owners = experts + ([f"{moe.block}.{shared}"] if shared else [])
        also = [f"{moe.block}.{moe.router}"] + ([f"{moe.block}.{moe.shared_gate}"] if shared else [])
        first = SmoothGroup([f"{x}.{p}" for x in owners for p in (gate, up)], norm=self.facts.mlp_norm,
                            observed=f"{moe.block}.{moe.router}", also_scaled=also,
                            experts=[f"{x}.{gate}" for x in experts])
        return [first] + [SmoothGroup([f"{x}.{_down}"], producer=f"{x}.{up}") for x in owners]

    # ------------------------------------------------------------------ pieces
    @property
    def head_dim(self) -> int:
        c = self.config
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    @property
    def rope_theta(self) -> float:
        return rope_theta(self.config)

    def embed(self, g: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """Token (and OPT position) embeddings, float32 [B, T, H]."""
        h = F.embedding(ids, g[self.facts.embed].float())
        if self.facts.embed_positions:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) + 2  # OPT's learned-position offset
            h = h + F.embedding(pos, g[self.facts.embed_positions].float())
        return h

    def head(self, g: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: float32 logits [B, T, V]."""
        h = self._norm(g, self.facts.final_norm, h)
        tied = self.config.get("tie_word_embeddings", self.facts.tie_default)
        return F.linear(h, (g[self.facts.embed] if tied else g["lm_head.weight"]).float())

    @property
    def _eps(self) -> float:
        return float(self.config.get("rms_norm_eps", 1e-6))

    def _norm(self, t, name: str, h: torch.Tensor) -> torch.Tensor:
        if self.facts.norm == "layer":
            return layer_norm(h, t[f"{name}.weight"], t[f"{name}.bias"])
        return rms_norm(h, t[f"{name}.weight"], self._eps)

    def layer_forward(
        self, i: int, lt: LayerTensors, h: torch.Tensor, sink: RoutingSink | None = None
    ) -> torch.Tensor:
        """One decoder layer on float32 hidden states [B, T, H]."""
        f = self.facts
        h = h + self._attention(i, lt, self._norm(lt, f.attn_norm, h))
        x = self._norm(lt, f.mlp_norm, h)
        if f.mlp == "relu":
            fc1, fc2 = f.mlp_linears
            return h + lt.linear(fc2, F.relu(lt.linear(fc1, x)))
        moe = self.moe_block(i)
        if moe is None:
            gate, up, down = f.mlp_linears
            return h + lt.linear(down, F.silu(lt.linear(gate, x)) * lt.linear(up, x))
        renormalize = f.moe.renormalize if isinstance(f.moe.renormalize, bool) else bool(
            self.config.get(f.moe.renormalize, False))
        out = self._moe(i, lt, x, *moe, renormalize, sink)
        shared = f.moe.shared_expert and f"{f.moe.block}.{f.moe.shared_expert}"
        if shared and lt.get(f"{shared}.{f.moe.linears[0]}.weight") is not None:
            y = swiglu(lt, shared, f.moe.linears, x)  # always on; Qwen-MoE's is gated
            gate = f.moe.shared_gate and torch.sigmoid(lt.linear(f"{f.moe.block}.{f.moe.shared_gate}", x))
            out = out + (y if gate is None else gate * y)
        return h + out

    # ------------------------------------------------------------------ blocks
    def _attention(self, i: int, lt: LayerTensors, x: torch.Tensor) -> torch.Tensor:
        c, f = self.config, self.facts
        if f.latent:  # DeepSeek
            return latent_attention(self, lt, x)
        b, t, _ = x.shape
        nh, hd = int(c["num_attention_heads"]), self.head_dim
        nkv = int(c.get("num_key_value_heads") or nh)
        q_proj, k_proj, v_proj, out = f.attn_linears
        q, k = lt.linear(q_proj, x).view(b, t, nh, hd), lt.linear(k_proj, x).view(b, t, nkv, hd)
        if f.qk_norm:  # before RoPE: over each head (Qwen3) or over the whole projection output (OLMoE)
            whole = f.qk_norm_over == "projection"
            q, k = (rms_norm(y.flatten(2) if whole else y, lt[f"{n}.weight"], self._eps).view(y.shape)
                    for y, n in zip((q, k), f.qk_norm))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = lt.linear(v_proj, x).view(b, t, nkv, hd).transpose(1, 2)
        if f.rope:
            cos, sin = rope_cos_sin(c, t, hd, x.device, self._rope_cache)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        window = self.sliding_window(i)
        if window is not None and t > window:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_causal_mask(t, window, x.device))
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return lt.linear(out, a.transpose(1, 2).reshape(b, t, nh * hd))

    def sliding_window(self, i: int) -> int | None:
        """Layer ``i``'s attention window (None: full causal attention), as the family's config says."""
        c, rule = self.config, self.facts.sliding
        window = c.get("sliding_window")
        if rule is None or not window:
            return None
        if rule == "all":
            return int(window)
        if not c.get("use_sliding_window", False):
            return None
        types = c.get("layer_types")
        sliding = types[i] == "sliding_attention" if types else i >= int(c.get("max_window_layers", 0))
        return int(window) if sliding else None

    def _moe(self, i: int, lt: LayerTensors, x: torch.Tensor, block: str, names: tuple[str, str, str],
             renormalize: bool, sink: RoutingSink | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        weights, ids = self.moe_route(i, lt, x2, block, renormalize, sink)
        return self.moe_experts(i, lt, x2, block, names, weights, ids).reshape(shape)

    def moe_route(self, i: int, lt: LayerTensors, x2: torch.Tensor, block: str, renormalize: bool,
                  sink: RoutingSink | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router of MoE layer ``i`` on tokens ``x2`` [M, H]: (top-k weights float32 [M, k], expert ids [M, k])."""
        router = f"{block}.{self.facts.moe.router}"
        logits = lt.linear(router, x2)
        if self.facts.moe.routing == "grouped":  # DeepSeek
            weights, ids = grouped_topk(logits, self.top_k, self.config, renormalize,
                                        lt.get(f"{router}.e_score_correction_bias"))
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            if renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if sink is not None:
            sink(i, ids)
        return weights, ids

    def moe_experts(self, i: int, lt: LayerTensors, x2: torch.Tensor, block: str, names: tuple[str, str, str],
                    weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routed experts of MoE layer ``i``: one W8A8 SwiGLU per expert on its tokens, weighted and summed.

        The reference loop; :mod:`offline.generate` overrides it to serve the experts through the runtime's
        MoE kernels or its offload engine."""
        out = torch.zeros_like(x2)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = swiglu(lt, f"{block}.experts.{e}", names, x2[tok])
            out.index_add_(0, tok, y * weights[tok, slot].unsqueeze(-1))
        return out
