"""Malformed HAQ checkpoints are rejected with errors naming the file/tensor and the problem."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_haq.format import (
    ROUTING_FILE,
    CheckpointError,
    is_ignored,
    parse_quantization_config,
    validate_checkpoint,
)

Q = "model.layers.0.self_attn.q_proj"
EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2"


def _shard_of(d, name):
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    return os.path.join(d, index[name])


def _edit_tensor(d, name, fn):
    """Rewrite the shard holding ``name`` with fn(tensors) applied."""
    path = _shard_of(d, name)
    t = load_file(path)
    fn(t)
    save_file(t, path, metadata={"format": "pt"})


def _edit_config(d, fn):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    fn(cfg)
    json.dump(cfg, open(path, "w"))


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


def _scale_with(name, value):
    def fn(t):
        s = t[name].clone()
        s[1, 0] = value
        t[name] = s

    return fn


def _truncate_shard(d):
    path = _shard_of(d, Q + ".weight")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)


def _drop_shard(d):
    os.remove(_shard_of(d, Q + ".weight"))


def _routing(fn):
    def edit(d):
        path = os.path.join(d, ROUTING_FILE)
        t = load_file(path)
        fn(t)
        save_file(t, path)

    return edit


CASES = {
    "missing weight_scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", lambda t: t.pop(Q + ".weight_scale")),
                             rf"{Q}\.weight'.*weight_scale is missing"),
    "bf16 weight with a scale": (lambda d: _edit_tensor(d, Q + ".weight", lambda t: t.__setitem__(
        Q + ".weight", t[Q + ".weight"].to(torch.bfloat16))), rf"{Q}\.weight' has dtype torch.bfloat16, expected torch.int8"),
    "bf16 weight without scale, not ignored": (
        lambda d: _edit_tensor(d, EXPERT + ".weight", lambda t: (t.__setitem__(EXPERT + ".weight", t[EXPERT + ".weight"].to(torch.bfloat16)), t.pop(EXPERT + ".weight_scale"))),
        rf"{EXPERT}\.weight' has dtype torch.bfloat16, expected torch.int8: the module is not in quantization_config.ignore"),
    "float16 scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", lambda t: t.__setitem__(
        Q + ".weight_scale", t[Q + ".weight_scale"].half())), rf"{Q}\.weight_scale' has dtype torch.float16, expected torch.float32"),
    "scale of wrong shape": (lambda d: _edit_tensor(d, Q + ".weight_scale", lambda t: t.__setitem__(
        Q + ".weight_scale", t[Q + ".weight_scale"][:-1])), rf"{Q}\.weight_scale' has shape \[127, 1\], expected \[128, 1\]"),
    "1-D int8 weight": (lambda d: _edit_tensor(d, Q + ".weight", lambda t: t.__setitem__(
        Q + ".weight", t[Q + ".weight"].flatten()[:128].contiguous())), rf"{Q}\.(weight' has shape \[128\], expected 2-D|weight_scale)"),
    "NaN scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", _scale_with(Q + ".weight_scale", float("nan"))),
                  rf"{Q}\.weight_scale': 1 of 128 scales are non-finite or <= 0"),
    "inf scale": (lambda d: _edit_tensor(d, EXPERT + ".weight_scale", _scale_with(EXPERT + ".weight_scale", float("inf"))),
                  rf"{EXPERT}\.weight_scale': 1 of .* non-finite or <= 0"),
    "zero scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", _scale_with(Q + ".weight_scale", 0.0)),
                   rf"{Q}\.weight_scale'.*non-finite or <= 0"),
    "negative scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", _scale_with(Q + ".weight_scale", -0.5)),
                       rf"{Q}\.weight_scale'.*-0\.5"),
    "unknown format_version": (lambda d: _edit_config(d, lambda c: c["quantization_config"].__setitem__("format_version", 7)),
                               r"config\.json: quantization_config: unknown format_version 7"),
    "unsupported weight scheme": (lambda d: _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__("num_bits", 4)),
                                  r"config_groups\.weights\.num_bits is 4"),
    "truncated shard": (_truncate_shard, r"model-0000\d-of-0000\d\.safetensors: .*(truncated|not a readable)"),
    "index names a missing shard": (_drop_shard, r"model\.safetensors\.index\.json: shard 'model-0000\d-of-0000\d\.safetensors'.* does not exist"),
    "routing stats of wrong shape": (_routing(lambda t: t.__setitem__("expert_counts", t["expert_counts"][:, :4].contiguous())),
                                     r"haq_routing\.safetensors: tensor 'expert_counts' has shape \[2, 4\], but the model has 2 MoE layers of 8 experts"),
    "routing transitions missing": (_routing(lambda t: t.pop("transition_counts")), r"haq_routing\.safetensors: tensor 'transition_counts' is missing"),
    "routing stats file missing": (lambda d: os.remove(os.path.join(d, ROUTING_FILE)), r"haq_routing\.safetensors: routing statistics named in config\.json are missing"),
}


@pytest.fixture
def damaged(haq_dir, tmp_path):
    def make(edit):
        d = str(tmp_path / "ckpt")
        shutil.copytree(haq_dir("mixtral"), d)
        edit(d)
        return d

    return make


def test_valid_checkpoint_passes(haq_dir):
    assert validate_checkpoint(haq_dir("mixtral")).routing_statistics == ROUTING_FILE


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_checkpoint_is_rejected(case, damaged):
    edit, pattern = CASES[case]
    d = damaged(edit)
    with pytest.raises(CheckpointError, match=pattern):
        validate_checkpoint(d)


def test_quantization_config_parsing():
    with pytest.raises(CheckpointError, match="quant_method is 'gptq'"):
        parse_quantization_config({"quant_method": "gptq"})
    from vllm_haq.format import HAQQuantConfig

    bad = HAQQuantConfig(ignore=["re:("]).to_dict()
    with pytest.raises(CheckpointError, match="not a valid regex"):
        parse_quantization_config(bad)
    assert parse_quantization_config(HAQQuantConfig().to_dict()) == HAQQuantConfig()
    assert is_ignored("lm_head", ["lm_head"]) and is_ignored("model.layers.0.mlp.gate", ["re:.*mlp\\.gate$"])
    assert not is_ignored("model.layers.0.mlp.gate_proj", ["re:.*mlp\\.gate$"])
