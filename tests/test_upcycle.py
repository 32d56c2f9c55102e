"""Sparse upcycling (offline/upcycle.py): a dense Llama becomes a Mixtral checkpoint that computes
the same function (identical experts, renormalized top-2 weights), and `haq convert` converts it.

No vLLM and no SmolLM2 download: a tiny random Llama from tests/tiny_models.py.
"""

import json
import os

import pytest
import torch

from tiny_models import CORPUS


@pytest.fixture(scope="module")
def windows(tiny_dir):
    from transformers import AutoTokenizer

    from offline.corpus import eval_windows, tokenize_documents

    tok = AutoTokenizer.from_pretrained(tiny_dir("llama"))
    return eval_windows(tokenize_documents(tok, [CORPUS]), 64, 4)


@pytest.fixture(scope="module")
def upcycled(tiny_dir, tmp_path_factory):
    from offline.upcycle import upcycle_llama_to_mixtral

    return upcycle_llama_to_mixtral(tiny_dir("llama"), str(tmp_path_factory.mktemp("upcycle") / "moe"))


def test_upcycled_checkpoint_layout(tiny_dir, upcycled):
    from offline.source import SafetensorsCheckpoint

    with open(os.path.join(tiny_dir("llama"), "config.json")) as f:
        dense = json.load(f)
    with open(os.path.join(upcycled, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
              "vocab_size", "tie_word_embeddings", "num_hidden_layers"):
        assert cfg[k] == dense[k], k
    assert os.path.exists(os.path.join(upcycled, "tokenizer.json"))

    d, m = SafetensorsCheckpoint(tiny_dir("llama")), SafetensorsCheckpoint(upcycled)
    assert not any(".mlp." in n for n in m.names())
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for dense_name, expert_name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            for e in range(8):
                assert torch.equal(m.get(f"{p}block_sparse_moe.experts.{e}.{expert_name}.weight"),
                                   d.get(f"{p}mlp.{dense_name}.weight"))
        gate = m.get(f"{p}block_sparse_moe.gate.weight")
        assert gate.shape == (8, cfg["hidden_size"]) and gate.dtype == torch.bfloat16 and gate.float().std() > 0
    for n in d.names():
        if ".mlp." not in n:
            assert torch.equal(m.get(n), d.get(n)), n


def test_upcycling_is_deterministic(tiny_dir, upcycled, tmp_path):
    from offline.source import SafetensorsCheckpoint
    from offline.upcycle import upcycle_llama_to_mixtral

    again = SafetensorsCheckpoint(upcycle_llama_to_mixtral(tiny_dir("llama"), str(tmp_path / "moe")))
    first = SafetensorsCheckpoint(upcycled)
    assert sorted(again.names()) == sorted(first.names())
    assert all(torch.equal(again.get(n), first.get(n)) for n in first.names())


def test_upcycled_moe_computes_the_dense_model(tiny_dir, upcycled, windows):
    """Reference forward (haq eval --backend hf, float32): per-token NLL equal to float rounding, and
    the routing really spreads tokens over the experts."""
    from offline.perplexity import hf_token_nll
    from offline.models import LayerTensors, spec_for
    from offline.source import SafetensorsCheckpoint

    dense = hf_token_nll(tiny_dir("llama"), windows)
    moe = hf_token_nll(upcycled, windows)
    assert (dense - moe).abs().max().item() < 1e-4

    with open(os.path.join(upcycled, "config.json")) as f:
        spec = spec_for(json.load(f))
    src = SafetensorsCheckpoint(upcycled)
    routed = []
    hidden = spec.embed({"model.embed_tokens.weight": src.get("model.embed_tokens.weight")}, windows)
    spec.layer_forward(0, LayerTensors(src.load_prefix(spec.layer_prefix(0))), hidden,
                       sink=lambda i, ids: routed.append(ids))
    assert len(routed[0].unique()) == 8  # every expert gets tokens


def test_transformers_mixtral_matches_dense_llama(tiny_dir, upcycled, windows):
    """Independent of this project's forward: transformers' own Mixtral and Llama give the same logits."""
    from transformers import AutoModelForCausalLM

    ids = windows[:2]
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32)(ids).logits
        moe_model = AutoModelForCausalLM.from_pretrained(upcycled, dtype=torch.float32)
        assert type(moe_model).__name__ == "MixtralForCausalLM"
        moe = moe_model(ids).logits
    assert (dense - moe).abs().max().item() < 1e-4 * dense.abs().max().item()


def test_perturbed_experts_differ_slightly(tiny_dir, tmp_path, windows):
    from offline.perplexity import hf_token_nll
    from offline.source import SafetensorsCheckpoint
    from offline.upcycle import upcycle_llama_to_mixtral

    out = upcycle_llama_to_mixtral(tiny_dir("llama"), str(tmp_path / "moe"), expert_noise=0.01, seed=3)
    src = SafetensorsCheckpoint(out)
    w0 = src.get("model.layers.0.block_sparse_moe.experts.0.w1.weight").float()
    w1 = src.get("model.layers.0.block_sparse_moe.experts.1.w1.weight").float()
    rel = ((w0 - w1).norm() / w0.norm()).item()
    assert 0.005 < rel < 0.03  # two independent 1% perturbations
    dense = hf_token_nll(tiny_dir("llama"), windows).mean().item()
    moe = hf_token_nll(out, windows).mean().item()
    assert dense != moe and abs(moe - dense) < 0.05 * dense


def test_upcycling_refuses_non_llama(tiny_dir, tmp_path):
    from offline.upcycle import UpcycleError, upcycle_llama_to_mixtral

    with pytest.raises(UpcycleError, match="Llama"):
        upcycle_llama_to_mixtral(tiny_dir("opt"), str(tmp_path / "moe"))
    assert not os.path.exists(tmp_path / "moe")


def test_haq_convert_upcycled(upcycled, calib_file, tmp_path, windows):
    """`haq convert` on the upcycled MoE: a valid HAQ MoE checkpoint with routing statistics, whose int8
    reference forward stays close to the bf16 MoE. (RTN keeps the suite fast; `make demo-moe` runs
    --method haq on the upcycled SmolLM2, and tests/test_calibrated.py covers haq on Mixtral.)"""
    from offline.cli import main
    from offline.perplexity import hf_token_nll
    from vllm_haq.format import ROUTING_FILE, validate_checkpoint

    out = str(tmp_path / "haq")
    rc = main(["convert", upcycled, out, "--method", "rtn", "--calib", calib_file, "--samples", "4",
               "--seq-len", "64"])
    assert rc == 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mixtral" and cfg["quantization_config"]["quant_method"] == "haq"
    assert os.path.exists(os.path.join(out, ROUTING_FILE))
    validate_checkpoint(out)  # what the plugin checks when vLLM loads it
    bf16 = hf_token_nll(upcycled, windows).mean().item()
    int8 = hf_token_nll(out, windows).mean().item()
    assert abs(int8 - bf16) < 0.02 * bf16
