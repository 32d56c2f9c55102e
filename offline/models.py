"""Pure-PyTorch reference forward passes of the supported model families.

The converter runs models one decoder layer at a time (bounded memory), and
the ``hf`` evaluation backend and the tests need a forward pass that applies
exactly HAQ's int8 arithmetic to a checkpoint's tensors. Both come from here:
every family is described by its tensor names and a float32 forward pass whose
linear layers dispatch on the stored tensors — int8 ``weight`` + ``weight_scale``
(+ ``input_smooth``, + the input rotation named in the config) run W8A8 via :mod:`vllm_haq.quant`, float weights run a
plain matmul. Tests check these forwards against ``transformers``.

Supported: OPT (pre-LayerNorm), Llama (incl. SmolLM2), Mixtral, Qwen2-MoE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from vllm_haq.errors import HAQError
from vllm_haq.format import COMPRESSED_TENSORS, rotation_from_transform_config
from vllm_haq.quant import w8a8_linear_reference

RoutingSink = Callable[[int, torch.Tensor], None]


class UnsupportedModelError(HAQError, ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


class LayerTensors:
    """The tensors of one decoder layer, by name relative to the layer prefix."""

    def __init__(self, tensors: dict[str, torch.Tensor], observer: Callable[[str, torch.Tensor], None] | None = None,
                 rotations: dict[str, int] | None = None):
        self.t = tensors
        self.observer = observer  # sees every linear's input (calibration statistics)
        self.rotations = rotations or {}  # module -> block-Hadamard order of its input (quantization_config)

    def get(self, name: str) -> torch.Tensor | None:
        return self.t.get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]

    def linear(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """Apply linear ``module`` to float32 ``x``: W8A8 if its weight is int8, else float."""
        if self.observer is not None:
            self.observer(module, x)
        w = self.t[f"{module}.weight"]
        bias = self.t.get(f"{module}.bias")
        if w.dtype == torch.int8:
            return w8a8_linear_reference(
                x, w, self.t[f"{module}.weight_scale"], bias, self.t.get(f"{module}.input_smooth"),
                self.rotations.get(module),
            )
        return F.linear(x, w.float(), None if bias is None else bias.float())


def layer_rotations(config: dict, prefix: str) -> dict[str, int]:
    """The input rotations (module relative to ``prefix`` -> block) that ``config.json`` gives one layer: HAQ's
    ``input_rotation``, or a compressed-tensors export's ``transform_config`` (the same rotations)."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == COMPRESSED_TENSORS:
        rotation = rotation_from_transform_config(qc.get("transform_config"), "config.json: quantization_config."
                                                  "transform_config")
    else:
        rotation = qc.get("input_rotation") or {}
    return {name[len(prefix):]: block for name, block in rotation.items() if name.startswith(prefix)}


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

    # ------------------------------------------------------------------ naming
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def layer_prefix(self, i: int) -> str:
        if self.family == "opt":
            return f"model.decoder.layers.{i}."
        return f"model.layers.{i}."

    def is_moe_layer(self, i: int) -> bool:
        if self.family == "mixtral":
            return True
        if self.family == "qwen2_moe":
            c = self.config
            step = int(c.get("decoder_sparse_step", 1) or 1)
            return c.get("num_experts", 0) > 0 and i not in (c.get("mlp_only_layers") or []) and (i + 1) % step == 0
        return False

    def moe_block(self, i: int) -> tuple[str, tuple[str, str, str]] | None:
        """(block name, (gate, up, down) linear names of each expert) if layer ``i`` is an MoE layer."""
        if self.family == "mixtral":
            return "block_sparse_moe", ("w1", "w3", "w2")
        if self.family == "qwen2_moe" and self.is_moe_layer(i):
            return "mlp", ("gate_proj", "up_proj", "down_proj")
        return None

    @property
    def num_experts(self) -> int:
        c = self.config
        return int(c.get("num_local_experts") or c.get("num_experts") or 0)

    @property
    def top_k(self) -> int:
        return int(self.config.get("num_experts_per_tok", 0))

    def linear_modules(self, i: int) -> list[str]:
        """Quantization targets of layer ``i``, relative to its prefix."""
        if self.family == "opt":
            return [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")] + ["fc1", "fc2"]
        names = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if self.family == "mixtral":
            names += [f"block_sparse_moe.experts.{e}.{w}" for e in range(self.num_experts) for w in ("w1", "w2", "w3")]
        elif self.family == "qwen2_moe" and self.is_moe_layer(i):
            names += [f"mlp.experts.{e}.{p}" for e in range(self.num_experts)
                      for p in ("gate_proj", "up_proj", "down_proj")]
            if self.config.get("shared_expert_intermediate_size", 0):
                names += [f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        return names

    def smoothing_groups(self, i: int) -> list["SmoothGroup"]:
        """Where activation smoothing of layer ``i`` can be folded exactly into the producer."""
        if self.family == "opt":
            attn = SmoothGroup(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                               norm="self_attn_layer_norm")
            vo = SmoothGroup(["self_attn.out_proj"], producer="self_attn.v_proj")
            ffn = SmoothGroup(["fc1"], norm="final_layer_norm")
            # relu(x / s) = relu(x) / s for s > 0, so fc1's rows can absorb fc2's factors
            return [attn, vo, ffn, SmoothGroup(["fc2"], producer="fc1")]
        c = self.config
        nh, hd = int(c["num_attention_heads"]), self.head_dim
        nkv = int(c.get("num_key_value_heads") or nh)
        groups = [
            SmoothGroup(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], norm="input_layernorm"),
            SmoothGroup(["self_attn.o_proj"], producer="self_attn.v_proj", heads=(nkv, nh // nkv, hd)),
        ]
        if self.family == "mixtral":
            experts = [f"block_sparse_moe.experts.{e}" for e in range(self.num_experts)]
            groups.append(SmoothGroup([f"{x}.{w}" for x in experts for w in ("w1", "w3")],
                                      norm="post_attention_layernorm", observed="block_sparse_moe.gate",
                                      also_scaled=["block_sparse_moe.gate"], experts=[f"{x}.w1" for x in experts]))
            groups += [SmoothGroup([f"{x}.w2"], producer=f"{x}.w3") for x in experts]
        elif self.family == "qwen2_moe" and self.is_moe_layer(i):
            experts = [f"mlp.experts.{e}" for e in range(self.num_experts)]
            shared = ["mlp.shared_expert"] if c.get("shared_expert_intermediate_size", 0) else []
            consumers = [f"{x}.{p}" for x in experts + shared for p in ("gate_proj", "up_proj")]
            also = ["mlp.gate"] + (["mlp.shared_expert_gate"] if shared else [])
            groups.append(SmoothGroup(consumers, norm="post_attention_layernorm", observed="mlp.gate", also_scaled=also,
                                      experts=[f"{x}.gate_proj" for x in experts]))
            groups += [SmoothGroup([f"{x}.down_proj"], producer=f"{x}.up_proj") for x in experts + shared]
        else:
            groups += [SmoothGroup(["mlp.gate_proj", "mlp.up_proj"], norm="post_attention_layernorm"),
                       SmoothGroup(["mlp.down_proj"], producer="mlp.up_proj")]
        return groups

    # ------------------------------------------------------------------ pieces
    @property
    def head_dim(self) -> int:
        c = self.config
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    def embed(self, g: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """Token (and OPT position) embeddings, float32 [B, T, H]."""
        if self.family == "opt":
            h = F.embedding(ids, g["model.decoder.embed_tokens.weight"].float())
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) + 2  # OPT's learned-position offset
            return h + F.embedding(pos, g["model.decoder.embed_positions.weight"].float())
        return F.embedding(ids, g["model.embed_tokens.weight"].float())

    def head(self, g: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: float32 logits [B, T, V]."""
        if self.family == "opt":
            h = F.layer_norm(
                h, h.shape[-1:], g["model.decoder.final_layer_norm.weight"].float(),
                g["model.decoder.final_layer_norm.bias"].float(), 1e-5,
            )
            emb = g["model.decoder.embed_tokens.weight"]
        else:
            h = _rms_norm(h, g["model.norm.weight"], self._eps)
            emb = g["model.embed_tokens.weight"]
        w = emb if self.config.get("tie_word_embeddings", self.family == "opt") else g["lm_head.weight"]
        return F.linear(h, w.float())

    @property
    def _eps(self) -> float:
        return float(self.config.get("rms_norm_eps", 1e-6))

    def layer_forward(
        self, i: int, lt: LayerTensors, h: torch.Tensor, sink: RoutingSink | None = None
    ) -> torch.Tensor:
        """One decoder layer on float32 hidden states [B, T, H]."""
        if self.family == "opt":
            x = F.layer_norm(h, h.shape[-1:], lt["self_attn_layer_norm.weight"].float(),
                             lt["self_attn_layer_norm.bias"].float(), 1e-5)
            h = h + self._attention(lt, x, out="self_attn.out_proj", rope=False)
            x = F.layer_norm(h, h.shape[-1:], lt["final_layer_norm.weight"].float(),
                             lt["final_layer_norm.bias"].float(), 1e-5)
            return h + lt.linear("fc2", F.relu(lt.linear("fc1", x)))
        x = _rms_norm(h, lt["input_layernorm.weight"], self._eps)
        h = h + self._attention(lt, x, out="self_attn.o_proj", rope=True)
        x = _rms_norm(h, lt["post_attention_layernorm.weight"], self._eps)
        moe = self.moe_block(i)
        if moe is not None:
            renormalize = self.family == "mixtral" or bool(self.config.get("norm_topk_prob", False))
            out = self._moe(i, lt, x, *moe, renormalize, sink)
            if lt.get("mlp.shared_expert.gate_proj.weight") is not None:
                shared = _swiglu(lt, "mlp.shared_expert", ("gate_proj", "up_proj", "down_proj"), x)
                out = out + torch.sigmoid(lt.linear("mlp.shared_expert_gate", x)) * shared
            return h + out
        return h + _swiglu(lt, "mlp", ("gate_proj", "up_proj", "down_proj"), x)

    # ------------------------------------------------------------------ blocks
    def _attention(self, lt: LayerTensors, x: torch.Tensor, out: str, rope: bool) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        nh, hd = int(c["num_attention_heads"]), self.head_dim
        nkv = int(c.get("num_key_value_heads") or nh)
        q = lt.linear("self_attn.q_proj", x).view(b, t, nh, hd).transpose(1, 2)
        k = lt.linear("self_attn.k_proj", x).view(b, t, nkv, hd).transpose(1, 2)
        v = lt.linear("self_attn.v_proj", x).view(b, t, nkv, hd).transpose(1, 2)
        if rope:
            cos, sin = _rope_cos_sin(t, hd, self.rope_theta, x.device)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return lt.linear(out, a.transpose(1, 2).reshape(b, t, nh * hd))

    @property
    def rope_theta(self) -> float:
        c = self.config
        params = c.get("rope_parameters") or {}
        scaling = c.get("rope_scaling") or {}
        rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rtype != "default":
            raise UnsupportedModelError(f"config.json: rope type {rtype!r} is not supported (only 'default')")
        return float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)

    def _moe(self, i: int, lt: LayerTensors, x: torch.Tensor, block: str, names: tuple[str, str, str],
             renormalize: bool, sink: RoutingSink | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        weights, ids = self.moe_route(i, lt, x2, block, renormalize, sink)
        return self.moe_experts(i, lt, x2, block, names, weights, ids).reshape(shape)

    def moe_route(self, i: int, lt: LayerTensors, x2: torch.Tensor, block: str, renormalize: bool,
                  sink: RoutingSink | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router of MoE layer ``i`` on tokens ``x2`` [M, H]: (top-k weights float32 [M, k], expert ids [M, k])."""
        logits = lt.linear(f"{block}.gate", x2)
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
            y = _swiglu(lt, f"{block}.experts.{e}", names, x2[tok])
            out.index_add_(0, tok, y * weights[tok, slot].unsqueeze(-1))
        return out


def _swiglu(lt: LayerTensors, block: str, names: tuple[str, str, str], x: torch.Tensor) -> torch.Tensor:
    gate, up, down = names
    return lt.linear(f"{block}.{down}", F.silu(lt.linear(f"{block}.{gate}", x)) * lt.linear(f"{block}.{up}", x))


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_cos_sin(t: int, hd: int, theta: float,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Computed on the CPU in float64 whatever ``device`` is, so every device rotates by the same float32 values."""
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


_FAMILIES = {"opt": "opt", "llama": "llama", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}


def spec_for(config: dict, source: str = "config.json") -> ModelSpec:
    """The ModelSpec for a Hugging Face config dict, or a clear UnsupportedModelError."""
    mtype = config.get("model_type")
    family = _FAMILIES.get(mtype)
    if family is None:
        raise UnsupportedModelError(
            f"{source}: model_type {mtype!r} (architectures {config.get('architectures')}) is not supported; "
            f"supported: {sorted(_FAMILIES)}"
        )
    if family == "opt":
        if not config.get("do_layer_norm_before", True):
            raise UnsupportedModelError(
                f"{source}: OPT with post-LayerNorm (do_layer_norm_before=false) is not supported")
        if config.get("word_embed_proj_dim", config["hidden_size"]) != config["hidden_size"]:
            raise UnsupportedModelError(
                f"{source}: OPT with project_in/out (word_embed_proj_dim != hidden_size) is not supported")
        if config.get("activation_function", "relu") != "relu":
            raise UnsupportedModelError(
                f"{source}: OPT activation {config.get('activation_function')!r} is not supported")
    elif config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")
    spec = ModelSpec(family, config)
    if family != "opt":
        spec.rope_theta  # validates the rope type early
    return spec


def global_tensor_names(spec: ModelSpec, names: list[str]) -> list[str]:
    """Tensors outside the decoder layers (embeddings, final norm, LM head)."""
    layer_root = "model.decoder.layers." if spec.family == "opt" else "model.layers."
    return [n for n in names if not n.startswith(layer_root)]


def log_softmax_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``ids[:, 1:]`` under ``logits[:, :-1]``."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)
