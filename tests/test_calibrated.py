"""Calibrated conversion methods: smoothing folds leave every family's layers unchanged; all methods
produce valid checkpoints whose int8 models stay close to the float model."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from offline.calibrated import InputStats, _apply_smoothing, _factors
from offline.convert import METHODS, ConvertOptions, convert
from offline.evaluate import hf_token_nll
from offline.models import LayerTensors, spec_for
from tiny_models import FAMILIES
from vllm_haq.format import validate_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_smoothing_leaves_each_layer_unchanged(family, tiny_dir):
    d = tiny_dir(family)
    spec = spec_for(json.load(open(os.path.join(d, "config.json"))))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    torch.manual_seed(0)
    h = torch.randn(2, 24, 128)
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        t = {k[len(p):]: v.double() for k, v in tensors.items() if k.startswith(p)}
        stats = InputStats()
        ref = spec.layer_forward(i, LayerTensors({k: v.float() for k, v in t.items()}, observer=stats), h)
        targets = spec.linear_modules(i)
        for g in spec.smoothing_groups(i):
            _apply_smoothing(t, g, _factors(t, g, [c for c in g.consumers if c in targets], stats, 0.5).double(), stats)
        out = spec.layer_forward(i, LayerTensors({k: v.float() for k, v in t.items()}), h)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rtn"])
@pytest.mark.parametrize("family", ["opt", "mixtral", "qwen2_moe"])
def test_calibrated_methods_convert_and_stay_close_to_float(method, family, tiny_dir, calib_file, tmp_path):
    out = str(tmp_path / "ckpt")
    convert(tiny_dir(family), out, ConvertOptions(method=method, calib=[calib_file], samples=4, seq_len=64))
    qcfg = validate_checkpoint(out)
    assert qcfg.producer["method"] == method
    if method in ("smoothquant", "haq"):
        assert set(qcfg.smoothing["alpha"]) == {"0", "1"}  # every layer recorded its choice
    ids = torch.randint(2, 500, (2, 48), generator=torch.Generator().manual_seed(3))
    drift = (hf_token_nll(out, ids) - hf_token_nll(tiny_dir(family), ids)).abs().mean()
    assert float(drift) < 0.05
