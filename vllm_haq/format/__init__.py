"""The HAQ checkpoint format (version 1, and 2 with input rotation).

* :mod:`.schema` — names, the two int8 schemes, ``quantization_config`` parsing, model facts
* :mod:`.compressed_tensors` — llm-compressor's compressed-tensors config as a view of the schema
* :mod:`.files` — shard listing, safetensors headers, config.json, atomic JSON writes
* :mod:`.validate` — every check a loader needs, with errors naming file and tensor
* :mod:`.hub` — Hugging Face ids resolved to a snapshot in the hub cache (converter and plugin alike)

Import from ``vllm_haq.format``; the submodules are its implementation.
"""

from vllm_haq.format.compressed_tensors import (CT_FORMAT, CT_READ_FORMATS, EXPORT_KEY, WEIGHT_ZERO_POINT,
                                                checkpoint_quant_config, from_compressed_tensors,
                                                rotation_from_transform_config, to_compressed_tensors,
                                                to_transform_config, transform_tensor_name)
from vllm_haq.format.files import (ST_DTYPES, index_weight_map, is_quantized_checkpoint,
                                   load_tensor, read_config, read_json, read_safetensors_header, read_tensor_headers,
                                   shard_files, write_json_atomic)
from vllm_haq.format.hub import (CHECKPOINT_FILES, SOURCE_FILES, ModelNotFoundError, config_dir, is_model_id,
                                 resolve_model, snapshot_commit)
from vllm_haq.format.schema import (ACTIVATION_SCHEME, COMPRESSED_TENSORS, CONFIG_FILE, CT_SCALE_DTYPES,
                                    DEFAULT_IGNORE, FORMAT_VERSION, INPUT_SMOOTH, QUANT_METHOD, ROTATION_FORMAT_VERSION,
                                    ROUTING_FILE, ROUTING_METADATA_KEY, SAFETENSORS_INDEX, SCALE_DTYPE,
                                    SUPPORTED_FORMAT_VERSIONS, WEIGHT, WEIGHT_DTYPE, WEIGHT_SCALE, WEIGHT_SCHEME,
                                    CheckpointError, HAQQuantConfig, is_ignored, moe_layout,
                                    parse_quantization_config)
from vllm_haq.format.validate import (check_config_agreement, check_index_matches, check_scale_values,
                                      validate_checkpoint, validate_routing_stats, validate_tensors)

__all__ = [
    "ACTIVATION_SCHEME", "CHECKPOINT_FILES", "COMPRESSED_TENSORS", "CONFIG_FILE", "CT_FORMAT", "CT_READ_FORMATS",
    "CT_SCALE_DTYPES",
    "DEFAULT_IGNORE", "EXPORT_KEY", "FORMAT_VERSION", "INPUT_SMOOTH", "QUANT_METHOD", "ROTATION_FORMAT_VERSION",
    "ROUTING_FILE", "ROUTING_METADATA_KEY", "SAFETENSORS_INDEX", "SCALE_DTYPE", "ST_DTYPES",
    "SUPPORTED_FORMAT_VERSIONS", "WEIGHT", "WEIGHT_DTYPE", "WEIGHT_SCALE", "WEIGHT_SCHEME", "WEIGHT_ZERO_POINT",
    "CheckpointError", "HAQQuantConfig", "ModelNotFoundError", "SOURCE_FILES", "config_dir", "is_model_id",
    "resolve_model", "snapshot_commit", "check_config_agreement", "check_index_matches",
    "check_scale_values", "checkpoint_quant_config", "from_compressed_tensors", "index_weight_map",
    "is_ignored", "is_quantized_checkpoint", "load_tensor", "moe_layout", "parse_quantization_config",
    "read_config", "read_json", "read_safetensors_header", "read_tensor_headers", "shard_files",
    "rotation_from_transform_config", "to_compressed_tensors", "to_transform_config", "transform_tensor_name",
    "validate_checkpoint", "validate_routing_stats", "validate_tensors", "write_json_atomic",
]
