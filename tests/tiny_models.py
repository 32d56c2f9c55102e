"""Tiny random models of every supported family, built with transformers and saved
as bf16 safetensors checkpoints (hidden 128, head_dim 64: vLLM's CPU attention
needs head_dim 64), plus a tiny byte-level BPE tokenizer so servers can run."""

from __future__ import annotations

import os

import torch

VOCAB = 512
FAMILIES = ("opt", "llama", "mixtral", "qwen2_moe")
# Families added after the first four (tests/test_families.py): their tiny models also get random norm weights
# and biases, so q/k-norm, qkv biases and the folds into norms are exercised with values other than 1 and 0.
DENSE_FAMILIES = ("llama3", "mistral", "qwen2", "qwen3")
# Qwen3-MoE (Qwen3-30B-A3B's layout, scaled down): q/k-norm, 32 experts, top-8, renormalized top-k weights.
# OLMoE (OLMoE-1B-7B's layout, scaled down): q/k-norm over the whole projections, 32 experts, top-8, the top-k
# weights not renormalized.
# DeepSeek-V2 (DeepSeek-V2's layout scaled down): latent attention (q_lora_rank 64; kv_lora_rank 512 + rope 64 = 576,
# the one latent width vLLM's CPU MLA decode kernel compiles), layer 0 dense, then 2 shared + 16 routed experts,
# top-4 of the 2 best of 4 groups, routed_scaling_factor 2.5, default RoPE. DEEPSEEK_V2_LITE: V2-Lite's q_proj (no
# q_lora_rank), greedy routing over one group and V2-Lite's YaRN RoPE (factor 40, mscale = mscale_all_dim = 0.707,
# an original context of 32 positions). DeepSeek-V3: the same layout with V3's routing (sigmoid scores, a random
# e_score_correction_bias, renormalized) and V3's YaRN (mscale = mscale_all_dim = 1).
NEW_MOE_FAMILIES = ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def deepseek_yarn(mscale: float) -> dict:
    return dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                                 "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale,
                                 "original_max_position_embeddings": 32}, max_position_embeddings=1280)


DEEPSEEK_V2_LITE = dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                        **deepseek_yarn(0.707))
# Llama 3.x RoPE on a tiny model: an original context of 32 positions puts most of head_dim 64's frequencies
# in llama3's scaled band, so the scaling changes the tests' 48-64 position sequences visibly.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model converts weights to int8 and "
    "serves them. Experts are routed by a gate; some are hot, some are cold. "
) * 20


def _config(family: str, **overrides):
    from transformers import LlamaConfig, MixtralConfig, OPTConfig, Qwen2MoeConfig

    if family in DENSE_FAMILIES:
        return _dense_config(family, **overrides)

    common = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, max_position_embeddings=512,
                  num_hidden_layers=2, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**{**common, "head_dim": 64, "num_key_value_heads": 1, "intermediate_size": 256,
                                 "moe_intermediate_size": 64, "num_experts": 32, "num_experts_per_tok": 8,
                                 "norm_topk_prob": True, "tie_word_embeddings": False, **overrides})
    if family == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(**{**common, "num_key_value_heads": 1, "intermediate_size": 64, "num_experts": 32,
                              "num_experts_per_tok": 8, "tie_word_embeddings": False, **overrides})
    if family in ("deepseek_v2", "deepseek_v3"):
        from transformers import DeepseekV2Config, DeepseekV3Config

        v3 = family == "deepseek_v3"
        return (DeepseekV3Config if v3 else DeepseekV2Config)(**{
            **common, "num_key_value_heads": 2, "intermediate_size": 256, "moe_intermediate_size": 64,
            "n_shared_experts": 2, "n_routed_experts": 16, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
            "q_lora_rank": 64, "kv_lora_rank": 512, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64,
            "v_head_dim": 64, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
            "tie_word_embeddings": False, "norm_topk_prob": v3,
            "topk_method": "noaux_tc" if v3 else "group_limited_greedy",
            **({"scoring_func": "sigmoid", **deepseek_yarn(1.0)} if v3 else {}), **overrides})
    if family == "opt":
        return OPTConfig(ffn_dim=256, word_embed_proj_dim=128, do_layer_norm_before=True, **common)
    if family == "llama":
        return LlamaConfig(intermediate_size=256, num_key_value_heads=1, tie_word_embeddings=False, **common)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=192, num_key_value_heads=1, num_local_experts=8,
                             num_experts_per_tok=2, tie_word_embeddings=False, **common)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=256, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                              num_key_value_heads=1, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
                              tie_word_embeddings=False, **common)
    raise ValueError(family)


def _dense_config(family: str, **overrides):
    """Llama 3.x (llama3 RoPE), Mistral (a 32-token sliding window, shorter than the tests' sequences), Qwen2
    (qkv biases, tied embeddings), Qwen3 (q/k-norm)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=512, num_hidden_layers=2, intermediate_size=256, bos_token_id=0,
                  eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    cls, extra = {
        "llama3": (LlamaConfig, dict(rope_parameters=dict(LLAMA3_ROPE))),
        "mistral": (MistralConfig, dict(sliding_window=32, head_dim=64)),
        "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),
        "qwen3": (Qwen3Config, dict(head_dim=64)),
    }[family]
    return cls(**{**common, **extra, **overrides})


def build_tokenizer(out_dir: str) -> None:
    """A small byte-level BPE tokenizer trained on CORPUS, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")
    fast.save_pretrained(out_dir)


def build_tiny_model(family: str, out_dir: str, seed: int = 0, **overrides) -> str:
    """Random-initialized bf16 checkpoint of ``family`` in ``out_dir`` (returned); ``overrides``: config fields."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger-than-init weights give logits with real spread (random init is near-uniform).
    with torch.no_grad():
        tied = family in DENSE_FAMILIES and cfg.tie_word_embeddings  # the embeddings are the LM head too
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("embed" not in name or tied):
                p.mul_(4.0)
            elif p.dim() == 1 and family in DENSE_FAMILIES + NEW_MOE_FAMILIES:  # norms around 1, biases around 0
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if name.endswith(".bias") else 1.0))
        for name, b in model.named_buffers():  # DeepSeek-V3's router bias steers the expert choice
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir)
    assert os.path.exists(os.path.join(out_dir, "config.json"))
    return out_dir
