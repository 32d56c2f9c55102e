"""A Mixtral-8x7B-shaped checkpoint with random weights and few decoder layers, for converter memory runs.

    .venv/bin/python benchmarks/synthetic_mixtral.py /tmp/synth-mixtral --layers 2

Full width (hidden 4096, 32 query / 8 KV heads, 8 experts of intermediate 14336, vocab 32000), bf16,
one safetensors shard per decoder layer (plus one for embeddings, final norm and LM head) and an index,
so ``haq convert`` streams it exactly like the real 93 GB model. One decoder layer is 2.90 GB in bf16
(1.45 G parameters, 97% of them in the experts). The tokenizer is copied from
../shared/models/tiny-mixtral (its 8192 ids are valid in the 32000-token vocabulary).
Write it under /tmp, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("HAQ_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))

CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "sliding_window": None, "router_aux_loss_coef": 0.02,
    "output_router_logits": False, "attention_dropout": 0.0, "initializer_range": 0.02,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def layer_tensors(i: int, c: dict, gen: torch.Generator):
    """Yield (shard tag, name, tensor) for decoder layer ``i``, a few hundred MB at a time."""
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    p = f"model.layers.{i}."

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    yield "attn", p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "attn", p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "attn", p + "self_attn.q_proj.weight", rnd(nh * hd, h)
    yield "attn", p + "self_attn.k_proj.weight", rnd(nkv * hd, h)
    yield "attn", p + "self_attn.v_proj.weight", rnd(nkv * hd, h)
    yield "attn", p + "self_attn.o_proj.weight", rnd(h, nh * hd)
    yield "attn", p + "block_sparse_moe.gate.weight", rnd(c["num_local_experts"], h)
    for e in range(c["num_local_experts"]):
        x = p + f"block_sparse_moe.experts.{e}."
        yield f"e{e}", x + "w1.weight", rnd(inter, h)
        yield f"e{e}", x + "w3.weight", rnd(inter, h)
        yield f"e{e}", x + "w2.weight", rnd(h, inter, std=0.02 / 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from safetensors.torch import save_file

    c = dict(CONFIG, num_hidden_layers=args.layers)
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(args.seed)
    weight_map, total = {}, 0

    def write(tag: str, tensors: dict) -> None:
        nonlocal total
        fname = f"model-{tag}.safetensors"
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: fname for n in tensors})

    h, v = c["hidden_size"], c["vocab_size"]
    write("globals", {
        "model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16),
        "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    })
    for i in range(args.layers):
        shard, tag = {}, None
        for t, name, tensor in layer_tensors(i, c, gen):
            if tag is not None and t != tag:
                write(f"l{i}-{tag}", shard)
                shard = {}
            tag = t
            shard[name] = tensor
        write(f"l{i}-{tag}", shard)
        print(f"layer {i} written", file=sys.stderr, flush=True)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    for fname in TOKENIZER_FILES:
        src = os.path.join(SHARED, "models", "tiny-mixtral", fname)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(tmp, fname))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(json.dumps({"out": args.out, "bytes": total, "layer_bytes": (total - 2 * v * h * 2 - 2 * h) // args.layers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
