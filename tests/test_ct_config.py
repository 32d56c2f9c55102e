"""The compressed-tensors ``quantization_config`` goes through the installed compressed-tensors library.

to_compressed_tensors() builds compressed-tensors' own ``QuantizationConfig`` and serializes it as
llm-compressor's ``ModelCompressor.update_config`` writes config.json; from_compressed_tensors() parses with
``QuantizationConfig.model_validate``. These tests hold for whichever compressed-tensors is installed (0.17.0,
vLLM 0.32's pin) and for the latest release (tests/test_ct_latest.py runs them against it): no key list or
default of the library is copied here except where a test pins what llm-compressor writes.

The one byte that changed when the hand-written dict gave way to the library: ``weights.observer`` is
``"memoryless_minmax"`` (it was ``null``). QuantizationArgs' validator fills in that observer for static
(weight) schemes, so it is what llm-compressor writes for W8A8 with compressed-tensors 0.17 to 0.19, and what
any reader gets after parsing the old ``null`` anyway; vLLM and transformers do not use it to load. From 0.20
the library leaves fields nobody set (observer, actorder, scale_dtype, ...) out of what it writes.
"""

import copy
import json

import pytest

from vllm_haq.format import (ACTIVATION_SCHEME, WEIGHT_SCHEME, CheckpointError, from_compressed_tensors,
                             to_compressed_tensors)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,  # noqa: E402
                                             preset_name_to_scheme)

IGNORE = ["lm_head", "model.layers.0.block_sparse_moe.gate"]
# What ModelCompressor.update_config adds beside QuantizationConfig.model_dump(exclude quant_method)
COMPRESSOR_KEYS = {"version", "quant_method", "sparsity_config", "transform_config"}
MINIMAL = {  # an llm-compressor W8A8 config with every defaulted key left out
    "quant_method": "compressed-tensors", "format": "int-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"strategy": "channel"},
        "input_activations": {"strategy": "token", "dynamic": True},
    }},
}


def test_export_config_is_the_librarys_w8a8_serialization():
    qc = to_compressed_tensors(IGNORE)
    # keys sorted at every level, as llm-compressor's json.dump(..., sort_keys=True) writes config.json
    assert json.dumps(qc) == json.dumps(qc, sort_keys=True)
    assert qc["version"] == ct.__version__ and qc["quant_method"] == "compressed-tensors"
    assert qc["sparsity_config"] == {} and qc["transform_config"] == {} and qc["ignore"] == IGNORE
    # a fixed point of the library: parsing and dumping again gives the same dict
    dumped = {k: v for k, v in qc.items() if k not in COMPRESSOR_KEYS}
    again = QuantizationConfig.model_validate(qc).model_dump(mode="json", exclude={"quant_method"})
    assert json.dumps(again, sort_keys=True) == json.dumps(dumped, sort_keys=True)
    # HAQ's scheme is exactly compressed-tensors' W8A8 preset
    (group,) = qc["config_groups"].values()
    preset = preset_name_to_scheme("W8A8", ["Linear"]).model_dump(mode="json")
    for part in ("weights", "input_activations"):
        assert group[part] == preset[part], part
    # what the library writes for a static weight scheme's observer (see the module docstring): pinned, with the
    # reason; compressed-tensors 0.20 leaves unset fields (observer, actorder, ...) out of its serialization
    written = QuantizationArgs(**WEIGHT_SCHEME).model_dump(mode="json")
    assert group["weights"].get("observer") == written.get("observer") in ("memoryless_minmax", None)
    assert group["input_activations"].get("observer") is None
    assert group["input_activations"] == QuantizationArgs(**ACTIVATION_SCHEME).model_dump(mode="json")


def test_export_config_round_trips_through_from_compressed_tensors():
    qc = to_compressed_tensors(IGNORE, version="9.9.9")
    got = from_compressed_tensors(copy.deepcopy(qc), "config.json: quantization_config")
    assert got.ignore == IGNORE and got.source_format == "compressed-tensors"
    assert got.producer["version"] == "9.9.9"
    # the pre-library export (weights.observer null) is still read: the library fills the observer in
    old = copy.deepcopy(qc)
    old["config_groups"]["group_0"]["weights"]["observer"] = None
    assert from_compressed_tensors(old).ignore == IGNORE


def test_defaults_and_presets_follow_the_library():
    assert from_compressed_tensors(copy.deepcopy(MINIMAL)).ignore == []
    # a group named after a preset, holding only its targets, is the preset (QuantizationConfig expands it)
    preset = {**MINIMAL, "config_groups": {"W8A8": ["Linear"]}, "ignore": ["lm_head"]}
    assert from_compressed_tensors(preset).ignore == ["lm_head"]
    # the library infers the strategy a config leaves out: tensor without group_size, which HAQ does not read
    no_strategy = copy.deepcopy(MINIMAL)
    del no_strategy["config_groups"]["group_0"]["weights"]["strategy"]
    with pytest.raises(CheckpointError, match=r"config_groups\.group_0\.weights\.strategy is 'tensor'; HAQ needs "
                                              r"'channel'"):
        from_compressed_tensors(no_strategy, "x/config.json: quantization_config")


def test_configs_the_library_rejects_name_the_file_and_give_haqs_reason_first():
    unknown = copy.deepcopy(MINIMAL)
    unknown["config_groups"]["group_0"]["weights"]["no_such_key"] = 1
    with pytest.raises(CheckpointError, match=r"^x/config.json: quantization_config: compressed-tensors "
                                              r"\S+ rejects it: .*no_such_key"):
        from_compressed_tensors(unknown, "x/config.json: quantization_config")
    # invalid for the library as well as not HAQ's scheme: HAQ's message names the key
    for part, key, value, match in (("weights", "group_size", 128, r"weights\.group_size is 128"),
                                    ("input_activations", "dynamic", False, r"input_activations\.dynamic is False"),
                                    ("input_activations", "strategy", "channel",
                                     r"input_activations\.strategy is 'channel'")):
        bad = copy.deepcopy(MINIMAL)
        bad["config_groups"]["group_0"][part][key] = value
        with pytest.raises(CheckpointError, match=match):
            from_compressed_tensors(bad, "x/config.json: quantization_config")
    bad = {**MINIMAL, "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}
    with pytest.raises(CheckpointError, match="kv_cache_scheme is set"):
        from_compressed_tensors(bad)
    with pytest.raises(CheckpointError, match="ignore must be a list of strings"):
        from_compressed_tensors({**MINIMAL, "ignore": "lm_head"})


def test_vllm_haq_format_does_not_import_compressed_tensors():
    """Importing the library takes seconds (torch.compile, transformers): only the compressed-tensors paths do."""
    import os
    import subprocess
    import sys

    code = ("import sys, vllm_haq.format, offline.interop; "
            "assert 'compressed_tensors' not in sys.modules, 'imported compressed_tensors'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
