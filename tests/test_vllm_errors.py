"""vLLM with quantization="haq" refuses bad checkpoints with clear errors, before any weight is used."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file


def _llm(model, **kw):
    from vllm import LLM

    return LLM(model=model, gpu_memory_utilization=0.3, max_model_len=128, enforce_eager=True, **kw)


def test_bf16_weight_in_haq_checkpoint_is_refused_by_vllm(haq_dir, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(haq_dir("llama"), d)
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    path = os.path.join(d, index[name])
    t = load_file(path)
    t[name] = t[name].to(torch.bfloat16)  # vLLM's loader would truncate this into int8 silently
    save_file(t, path, metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"model\.layers\.1\.mlp\.down_proj\.weight' has dtype torch.bfloat16, "
                                        r"expected torch.int8"):
        _llm(d, quantization="haq")


def test_unconverted_model_with_haq_is_refused(tiny_dir):
    with pytest.raises(Exception, match="needs a HAQ checkpoint.*haq convert"):
        _llm(tiny_dir("opt"), quantization="haq")


def test_loader_checks_catch_what_vllm_loaders_skip():
    """The per-parameter loader wrappers (the last line of defence behind validate_checkpoint)."""
    from vllm_haq.format import CheckpointError
    from vllm_haq.vllm.linear import checked_loader
    from vllm_haq.vllm.moe_method import _checked_moe_loader

    calls = []
    ok = checked_loader(lambda p, w, *a: calls.append(w), "model.layers.0.self_attn.qkv_proj", "weight", torch.int8, 16)
    ok(None, torch.zeros(4, 16, dtype=torch.int8), "q")
    assert len(calls) == 1
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight \(shard 'k'\) has dtype torch.bfloat16"):
        ok(None, torch.zeros(4, 16, dtype=torch.bfloat16), "k")
    with pytest.raises(CheckpointError, match=r"shape \[4, 8\], expected \[\*, 16\]"):
        ok(None, torch.zeros(4, 8, dtype=torch.int8), "q")
    scale = checked_loader(lambda *a: None, "model.layers.0.mlp.down_proj", "weight_scale", torch.float32, 1)
    with pytest.raises(CheckpointError, match="non-finite or <= 0"):
        scale(None, torch.tensor([[1.0], [0.0]]))
    moe = _checked_moe_loader(lambda *a: True, "model.layers.0.block_sparse_moe.experts", "w2_weight_scale",
                              torch.float32)
    with pytest.raises(CheckpointError, match=r"experts.5.w2.weight_scale' \(expert 5, w2\).*non-finite"):
        moe(None, torch.tensor([[float("nan")]]), "experts.5.w2.weight_scale", "w2", 5)
