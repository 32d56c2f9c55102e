"""Importing compressed-tensors W8A8 int8 checkpoints (llm-compressor's format) as HAQ checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline.interop import InteropError, import_compressed_tensors
from vllm_haq.format import validate_checkpoint

CT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "int-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    }},
    "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"],
}


def _as_compressed_tensors(haq: str, out: str, zero_point: int = 0) -> str:
    """Rewrite a HAQ checkpoint the way llm-compressor stores W8A8 (bf16 scales, zero points)."""
    shutil.copytree(haq, out)
    for f in os.listdir(out):
        if f.startswith("model-"):
            t = load_file(os.path.join(out, f))
            for name in [n for n in t if n.endswith(".weight_scale")]:
                t[name] = t[name].to(torch.bfloat16)
                t[name.replace("weight_scale", "weight_zero_point")] = torch.full_like(t[name], zero_point, dtype=torch.int8)
            save_file(t, os.path.join(out, f))
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"] = CT_CONFIG
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    return out


def test_import_round_trip(haq_dir, tmp_path):
    ct = _as_compressed_tensors(haq_dir("mixtral"), str(tmp_path / "ct"))
    out = import_compressed_tensors(ct, str(tmp_path / "haq"))
    qcfg = validate_checkpoint(out)
    assert qcfg.producer["source"] == "compressed-tensors" and qcfg.ignore == CT_CONFIG["ignore"]
    name = "model.layers.1.block_sparse_moe.experts.2.w2"
    got = {}
    for f in os.listdir(out):
        if f.startswith("model-"):
            got.update(load_file(os.path.join(out, f)))
    orig = {}
    for f in os.listdir(haq_dir("mixtral")):
        if f.startswith("model-"):
            orig.update(load_file(os.path.join(haq_dir("mixtral"), f)))
    assert torch.equal(got[name + ".weight"], orig[name + ".weight"])
    assert got[name + ".weight_scale"].dtype == torch.float32 and name + ".weight_zero_point" not in got


def test_import_refuses_asymmetric_and_other_schemes(haq_dir, tmp_path):
    ct = _as_compressed_tensors(haq_dir("opt"), str(tmp_path / "ct"), zero_point=3)
    with pytest.raises(InteropError, match="weight_zero_point is non-zero"):
        import_compressed_tensors(ct, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    cfg = json.load(open(os.path.join(ct, "config.json")))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    json.dump(cfg, open(os.path.join(ct, "config.json"), "w"))
    with pytest.raises(InteropError, match=r"weights\.num_bits is 4"):
        import_compressed_tensors(ct, str(tmp_path / "x"))
