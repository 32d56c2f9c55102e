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


def _rotate(rotation, version=2):
    def edit(cfg):
        cfg["quantization_config"].update(format_version=version, input_rotation=rotation)
    return edit


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


def _pad_shard(d):
    with open(_shard_of(d, Q + ".weight"), "ab") as f:
        f.write(b"\0" * 64)


def _drop_shard(d):
    os.remove(_shard_of(d, Q + ".weight"))


def _routing(fn):
    def edit(d):
        path = os.path.join(d, ROUTING_FILE)
        t = load_file(path)
        fn(t)
        save_file(t, path)

    return edit


def _index_path(d):
    return os.path.join(d, "model.safetensors.index.json")


def _edit_index(fn):
    def edit(d):
        index = json.load(open(_index_path(d)))
        fn(index["weight_map"])
        json.dump(index, open(_index_path(d), "w"))

    return edit


def _add_tensors(tensors, shard_of=Q + ".weight", index=True):
    """Store extra tensors in the shard holding ``shard_of`` (and list them in the index)."""
    def edit(d):
        path = _shard_of(d, shard_of)
        t = load_file(path)
        t.update(tensors)
        save_file(t, path, metadata={"format": "pt"})
        if index:
            _edit_index(lambda m: m.update({n: os.path.basename(path) for n in tensors}))(d)

    return edit


def _flip_header_bytes(d):
    path = _shard_of(d, Q + ".weight")
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(b"\xff\x00{]")


def _header_length_overflow(d):
    path = _shard_of(d, Q + ".weight")
    with open(path, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))


def _duplicate_in_other_shard(d):
    shards = sorted(set(json.load(open(_index_path(d)))["weight_map"].values()))
    other = next(s for s in shards if os.path.join(d, s) != _shard_of(d, Q + ".weight"))
    path = os.path.join(d, other)
    t = load_file(path)
    t[Q + ".weight"] = torch.zeros(128, 128, dtype=torch.int8)
    save_file(t, path, metadata={"format": "pt"})


def _int8_layer(layer, expert=None):
    module = "self_attn.q_proj" if expert is None else f"block_sparse_moe.experts.{expert}.w1"
    base = f"model.layers.{layer}." + module
    rows = 128 if expert is None else 192
    return {base + ".weight": torch.ones(rows, 128, dtype=torch.int8), base + ".weight_scale": torch.ones(rows, 1)}


def _smooth(value, size=128):
    s = torch.ones(size)
    s[3] = value
    return {Q + ".input_smooth": s}


def _write(name, text):
    def edit(d):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)

    return edit


CASES = {
    "flipped header bytes": (_flip_header_bytes,
                             r"model-0000\d-of-0000\d\.safetensors: not a readable safetensors file"),
    "header length overflow": (_header_length_overflow,
                               r"model-0000\d-of-0000\d\.safetensors: not a readable safetensors file"),
    "tensor stored in two shards": (_duplicate_in_other_shard, rf"tensor '{Q}\.weight' also stored in"),
    "index maps a tensor to the wrong shard": (
        _edit_index(lambda m: m.__setitem__(Q + ".weight", next(f for n, f in m.items() if f != m[Q + ".weight"]))),
        rf"index\.json: tensor '{Q}\.weight' is mapped to 'model-0000\d-of-0000\d\.safetensors' but stored in"),
    "tensor missing from the index": (
        _edit_index(lambda m: m.pop(Q + ".weight_scale")),
        rf"index\.json: tensors \['{Q}\.weight_scale'\] stored in .* are not in the index"),
    "index names a tensor no shard holds": (
        _edit_index(lambda m: m.__setitem__("lm_head.bias", m[Q + ".weight"])),
        r"index\.json: tensor 'lm_head\.bias' is mapped to .* which does not hold it"),
    "unreadable index": (_write("model.safetensors.index.json", "{not json"),
                         r"index\.json: unreadable safetensors index"),
    "config.json not JSON": (_write("config.json", "{\"quantization_config\": "), r"config\.json: invalid JSON"),
    "config.json missing": (lambda d: os.remove(os.path.join(d, "config.json")), r"config\.json: missing"),
    "no quantization_config": (lambda d: _edit_config(d, lambda c: c.pop("quantization_config")),
                               r"config\.json: no quantization_config \(not a HAQ checkpoint\)"),
    "extra decoder layer": (
        _add_tensors(_int8_layer(5)),
        r"tensor 'model\.layers\.5\.self_attn\.q_proj\.weight' belongs to decoder layer 5, but .*num_hidden_layers=2"),
    "extra expert": (_add_tensors(_int8_layer(0, expert=8)),
                     r"belongs to expert 8, but .*config\.json gives 8 experts per MoE layer"),
    "config has more layers than the tensors": (
        lambda d: _edit_config(d, lambda c: c.__setitem__("num_hidden_layers", 3)),
        r"no tensors for decoder layers \[2\] of the num_hidden_layers=3"),
    "config has fewer experts than the tensors": (
        lambda d: _edit_config(d, lambda c: c.__setitem__("num_local_experts", 4)),
        r"belongs to expert [4-7], but .*gives 4 experts per MoE layer"),
    "config has more experts than the tensors": (
        lambda d: _edit_config(d, lambda c: c.__setitem__("num_local_experts", 10)),
        r"MoE layer 0 has no tensors for experts \[8, 9\] of the 10"),
    "config hidden_size disagrees": (lambda d: _edit_config(d, lambda c: c.__setitem__("hidden_size", 64)),
                                     r"has 128 input features, but .*hidden_size=64"),
    "orphan weight_scale": (_add_tensors({"model.layers.0.self_attn.x_proj.weight_scale": torch.ones(128, 1)}),
                            r"x_proj\.weight_scale' has no matching 'model\.layers\.0\.self_attn\.x_proj\.weight'"),
    "int8 weight without its scale": (
        _add_tensors({"model.layers.0.self_attn.x_proj.weight": torch.ones(128, 128, dtype=torch.int8)}),
        r"x_proj\.weight' is int8 but model\.layers\.0\.self_attn\.x_proj\.weight_scale is missing"),
    "NaN input_smooth": (_add_tensors(_smooth(float("nan"))), rf"{Q}\.input_smooth': 1 of 128 scales are non-finite"),
    "input_smooth of wrong length": (_add_tensors(_smooth(1.0, size=64)),
                                     rf"{Q}\.input_smooth' is torch\.float32 \[64\], expected torch\.float32 \[128\]"),
    "routing counts negative": (_routing(lambda t: t["expert_counts"].__setitem__((0, 0), -3)),
                                r"haq_routing\.safetensors: tensor 'expert_counts' has negative counts"),
    "routing counts as floats": (_routing(lambda t: t.__setitem__("expert_counts", t["expert_counts"].float())),
                                 r"tensor 'expert_counts' has dtype torch\.float32, expected torch\.int64"),
    "routing layers do not match the model": (_routing(lambda t: t.__setitem__("layer_indices", torch.tensor([0, 5]))),
                                              r"layer_indices \[0, 5\] do not match the model's MoE layers \[0, 1\]"),
    "routing stats not safetensors": (_write("haq_routing.safetensors", "garbage"),
                                      r"haq_routing\.safetensors: not a readable safetensors file"),
    "routing stats for a dense model": (lambda d: _edit_config(d, lambda c: c.pop("num_local_experts")),
                                        r"routing statistics given for a dense model"),

    "missing weight_scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", lambda t: t.pop(Q + ".weight_scale")),
                             rf"{Q}\.weight'.*weight_scale is missing"),
    "bf16 weight with a scale": (
        lambda d: _edit_tensor(d, Q + ".weight", lambda t: t.__setitem__(
            Q + ".weight", t[Q + ".weight"].to(torch.bfloat16))),
        rf"{Q}\.weight' has dtype torch.bfloat16, expected torch.int8"),
    "bf16 weight without scale, not ignored": (
        lambda d: _edit_tensor(d, EXPERT + ".weight", lambda t: (
            t.__setitem__(EXPERT + ".weight", t[EXPERT + ".weight"].to(torch.bfloat16)),
            t.pop(EXPERT + ".weight_scale"))),
        rf"{EXPERT}\.weight' has dtype torch.bfloat16, expected torch.int8: "
        r"the module is not in quantization_config.ignore"),
    "float16 scale": (
        lambda d: _edit_tensor(d, Q + ".weight_scale", lambda t: t.__setitem__(
            Q + ".weight_scale", t[Q + ".weight_scale"].half())),
        rf"{Q}\.weight_scale' has dtype torch.float16, expected torch.float32"),
    "scale of wrong shape": (
        lambda d: _edit_tensor(d, Q + ".weight_scale", lambda t: t.__setitem__(
            Q + ".weight_scale", t[Q + ".weight_scale"][:-1])),
        rf"{Q}\.weight_scale' has shape \[127, 1\], expected \[128, 1\]"),
    "1-D int8 weight": (
        lambda d: _edit_tensor(d, Q + ".weight", lambda t: t.__setitem__(
            Q + ".weight", t[Q + ".weight"].flatten()[:128].contiguous())),
        rf"{Q}\.(weight' has shape \[128\], expected 2-D|weight_scale)"),
    "NaN scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", _scale_with(Q + ".weight_scale", float("nan"))),
                  rf"{Q}\.weight_scale': 1 of 128 scales are non-finite or <= 0"),
    "inf scale": (
        lambda d: _edit_tensor(d, EXPERT + ".weight_scale", _scale_with(EXPERT + ".weight_scale", float("inf"))),
        rf"{EXPERT}\.weight_scale': 1 of .* non-finite or <= 0"),
    "zero scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", _scale_with(Q + ".weight_scale", 0.0)),
                   rf"{Q}\.weight_scale'.*non-finite or <= 0"),
    "negative scale": (lambda d: _edit_tensor(d, Q + ".weight_scale", _scale_with(Q + ".weight_scale", -0.5)),
                       rf"{Q}\.weight_scale'.*-0\.5"),
    "unknown format_version": (
        lambda d: _edit_config(d, lambda c: c["quantization_config"].__setitem__("format_version", 7)),
        r"config\.json: quantization_config: unknown format_version 7"),
    "rotation in a version-1 config": (
        lambda d: _edit_config(d, _rotate({Q: 64}, version=1)),
        r"quantization_config: input_rotation needs format_version 2, the config says 1"),
    "rotation block not a power of two": (lambda d: _edit_config(d, _rotate({Q: 48})),
                                          rf"input_rotation\['{Q}'\] is 48, expected a power of two"),
    "rotation of a float module": (lambda d: _edit_config(d, _rotate({"lm_head": 64})),
                                   r"input_rotation names 'lm_head', which has no int8 weight 'lm_head\.weight'"),
    "rotation block wider than the layer": (
        lambda d: _edit_config(d, _rotate({Q: 256})),
        rf"{Q}\.weight': its 128 input features are not a multiple of the rotation block 256"),
    "unsupported weight scheme": (
        lambda d: _edit_config(
            d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__("num_bits", 4)),
        r"config_groups\.weights\.num_bits is 4"),
    "truncated shard": (_truncate_shard, r"model-0000\d-of-0000\d\.safetensors: not a readable safetensors file"),
    "padded shard": (_pad_shard, r"model-0000\d-of-0000\d\.safetensors: not a readable safetensors file"),
    "index names a missing shard": (
        _drop_shard,
        r"model\.safetensors\.index\.json: shard 'model-0000\d-of-0000\d\.safetensors'.* does not exist"),
    "routing stats of wrong shape": (
        _routing(lambda t: t.__setitem__("expert_counts", t["expert_counts"][:, :4].contiguous())),
        r"haq_routing\.safetensors: tensor 'expert_counts' has shape \[2, 4\], "
        r"but the model has 2 MoE layers of 8 experts"),
    "routing transitions missing": (_routing(lambda t: t.pop("transition_counts")),
                                    r"haq_routing\.safetensors: tensor 'transition_counts' is missing"),
    "routing stats file missing": (lambda d: os.remove(os.path.join(d, ROUTING_FILE)),
                                   r"haq_routing\.safetensors: routing statistics named in config\.json are missing"),
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


def test_at_least_25_kinds_of_corruption():
    assert len(CASES) >= 25


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
    rotated = HAQQuantConfig(input_rotation={"a.q_proj": 64, "a.k_proj": 64, "a.o_proj": 128})
    assert rotated.to_dict()["format_version"] == 2 and HAQQuantConfig().to_dict()["format_version"] == 1
    assert parse_quantization_config(rotated.to_dict()).input_rotation == rotated.input_rotation
    assert rotated.rotation_of(["a.q_proj", "a.k_proj"], "a.qkv_proj") == 64
    assert rotated.rotation_of(["a.gate_proj", "a.up_proj"], "a.gate_up_proj") is None
    with pytest.raises(CheckpointError, match=r"gives \['128', 'None'\] for \['a.o_proj', 'a.v_proj'\], which vLLM "
                                              r"fuses into one layer 'x'"):
        rotated.rotation_of(["a.o_proj", "a.v_proj"], "x")
    assert is_ignored("lm_head", ["lm_head"]) and is_ignored("model.layers.0.mlp.gate", ["re:.*mlp\\.gate$"])
    assert not is_ignored("model.layers.0.mlp.gate_proj", ["re:.*mlp\\.gate$"])
