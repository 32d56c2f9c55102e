"""Sparse upcycling: a dense Llama checkpoint -> a Mixtral-architecture MoE checkpoint.

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints", arXiv 2212.05055) initializes every expert of an MoE layer with the
dense model's MLP. Here (no training follows; the result is a test and demo model with a
real pretrained model's weights and activation outliers, since no pretrained MoE can be
downloaded on the project's machines):

* ``config.json``: ``model_type: mixtral`` / ``MixtralForCausalLM`` with the dense model's
  attention (heads, KV heads, head_dim), RoPE parameters, RMSNorm epsilon, vocabulary, tied
  embeddings and special tokens; ``num_local_experts`` experts, ``num_experts_per_tok``
  routed per token, expert ``intermediate_size`` = the dense ``intermediate_size``.
* Every non-MLP tensor (embeddings, norms, attention, LM head) is copied unchanged.
* Layer ``l``, expert ``e``: ``block_sparse_moe.experts.e.w1/w3/w2.weight`` = the dense
  ``mlp.gate_proj/up_proj/down_proj.weight`` (plus, only with ``expert_noise > 0``, a
  deterministic Gaussian perturbation of relative size ``expert_noise``: each row gets noise
  of std ``expert_noise`` x that row's RMS, from ``torch.Generator`` seeded with
  ``seed * 1_000_003 + 1000 * l + e + 1`` (w1, w3, w2 drawn in that order)).
* Router ``block_sparse_moe.gate.weight`` [E, H]: N(0, ``router_std``²) from a generator seeded
  with ``seed * 1_000_003 + 1000 * l``, stored in the checkpoint's dtype.
* The tokenizer and generation config files are copied.

With identical experts (``expert_noise=0``, the default) and Mixtral's renormalized top-k
weights (they sum to 1), every token's MoE output is ``sum_k w_k * mlp(x) = mlp(x)``: the
upcycled model computes exactly the dense model, up to float rounding of the weighted sum.
``tests/test_upcycle.py`` checks this on a tiny Llama; ``examples/demo.py --moe`` checks it on
SmolLM2-135M-Instruct (perplexity of the bf16 MoE vs the dense model) and serves the upcycled
model with expert offloading. The router still routes every token to 2 of the 8 experts (a
random projection of the hidden state, so the routing has real per-token structure), which is
what offloading exercises.

Output: one safetensors shard per decoder layer (+ one for the global tensors) with a
``model.safetensors.index.json``, written to ``OUT.tmp`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from offline.source import SafetensorsCheckpoint
from vllm_haq.errors import HAQError
from vllm_haq.format import CONFIG_FILE, SAFETENSORS_INDEX, write_json_atomic

MLP_TO_EXPERT = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
# config keys carried over from the dense Llama config unchanged
_CARRIED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "attention_dropout",
)
_NOT_COPIED = (".safetensors", ".safetensors.index.json", "config.json")


class UpcycleError(HAQError, ValueError):
    """The dense checkpoint cannot be upcycled (not a Llama, biases, missing tensors)."""


def mixtral_config(dense: dict, num_experts: int, top_k: int) -> dict:
    """The Mixtral config.json for an upcycled ``dense`` Llama config."""
    if dense.get("model_type") != "llama":
        raise UpcycleError(f"upcycling needs a Llama checkpoint (model_type 'llama'), got {dense.get('model_type')!r}")
    if dense.get("attention_bias") or dense.get("mlp_bias"):
        raise UpcycleError("Mixtral has no attention or MLP biases; this Llama has some")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"need 1 <= num_experts_per_tok ({top_k}) <= num_local_experts ({num_experts})")
    cfg = {k: dense[k] for k in _CARRIED if k in dense}
    cfg.update(
        model_type="mixtral", architectures=["MixtralForCausalLM"],
        dtype=dense.get("dtype") or dense.get("torch_dtype"),
        num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
        output_router_logits=False, router_aux_loss_coef=0.0, router_jitter_noise=0.0,
    )
    if cfg["dtype"] is None:
        cfg.pop("dtype")
    return cfg


def _upcycle_layer(lt: dict[str, torch.Tensor], i: int, where: str, num_experts: int, router_std: float,
                   expert_noise: float, seed: int) -> dict[str, torch.Tensor]:
    """Decoder layer ``i`` of the MoE (names relative to the layer) from the dense layer's tensors ``lt``:
    everything but the MLP as is, a random router, and ``num_experts`` copies of the MLP (optionally noised)."""
    out = {rel: t for rel, t in lt.items() if not rel.startswith("mlp.")}
    for dense_name, _ in MLP_TO_EXPERT:
        if f"mlp.{dense_name}.weight" not in lt:
            raise UpcycleError(f"{where}: layer {i} has no mlp.{dense_name}.weight")
    extra = sorted(r for r in lt if r.startswith("mlp.") and r[4:].split(".")[0] not in dict(MLP_TO_EXPERT))
    if extra:
        raise UpcycleError(f"{where}: layer {i} has MLP tensors upcycling does not know: {extra}")
    hidden = lt["mlp.gate_proj.weight"].shape[1]
    dtype = lt["mlp.gate_proj.weight"].dtype
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * i)
    router = torch.randn(num_experts, hidden, generator=gen, dtype=torch.float32) * router_std
    out["block_sparse_moe.gate.weight"] = router.to(dtype)
    for e in range(num_experts):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * i + e + 1)
        for dense_name, expert_name in MLP_TO_EXPERT:
            w = lt[f"mlp.{dense_name}.weight"]
            if expert_noise > 0:
                wf = w.float()
                rms = wf.pow(2).mean(1, keepdim=True).sqrt()
                w = (wf + torch.randn(wf.shape, generator=gen) * rms * expert_noise).to(dtype)
            else:
                w = w.clone()
            out[f"block_sparse_moe.experts.{e}.{expert_name}.weight"] = w
    return out


def upcycle_llama_to_mixtral(dense_dir: str, out_dir: str, num_experts: int = 8, top_k: int = 2,
                             router_std: float = 0.02, expert_noise: float = 0.0, seed: int = 0) -> str:
    """Write the upcycled Mixtral checkpoint of ``dense_dir`` to ``out_dir`` (see the module docstring)."""
    from safetensors.torch import save_file

    with open(os.path.join(dense_dir, "config.json")) as f:
        dense = json.load(f)
    cfg = mixtral_config(dense, num_experts, top_k)
    src = SafetensorsCheckpoint(dense_dir)
    names = src.names()
    layers = int(dense["num_hidden_layers"])
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map: dict[str, str] = {}
    total = 0

    def write(tensors: dict[str, torch.Tensor], fname: str) -> None:
        nonlocal total
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()

    shards = layers + 1
    write({n: src.get(n) for n in names if not n.startswith("model.layers.")},
          f"model-00001-of-{shards:05d}.safetensors")
    for i in range(layers):
        prefix = f"model.layers.{i}."
        lt = src.load_prefix(prefix)
        out = {prefix + rel: t for rel, t in
               _upcycle_layer(lt, i, dense_dir, num_experts, router_std, expert_noise, seed).items()}
        write(out, f"model-{i + 2:05d}-of-{shards:05d}.safetensors")
        del lt, out
    write_json_atomic(os.path.join(tmp, SAFETENSORS_INDEX),
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    upcycling = {"source": os.path.abspath(dense_dir), "method": "sparse upcycling (Komatsuzaki et al. 2022)",
                 "num_local_experts": num_experts, "num_experts_per_tok": top_k, "router_std": router_std,
                 "expert_noise": expert_noise, "seed": seed}
    write_json_atomic(os.path.join(tmp, CONFIG_FILE), {**cfg, "haq_upcycling": upcycling})
    for fname in os.listdir(dense_dir):
        path = os.path.join(dense_dir, fname)
        if os.path.isfile(path) and not fname.endswith(_NOT_COPIED):
            shutil.copy2(path, os.path.join(tmp, fname))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
