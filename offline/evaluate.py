"""Perplexity with GPTQ's protocol, and the pure-PyTorch (``hf``) backend.

Protocol: the evaluation documents are joined by blank lines, tokenized once,
cut into non-overlapping windows of ``seq_len`` tokens (remainder dropped);
every token of a window but the first is scored given its prefix in the
window; perplexity = exp(mean negative log-likelihood).

The ``hf`` backend runs :mod:`offline.models` layer by layer (one decoder layer
in memory at a time) with exactly HAQ's int8 arithmetic for int8 tensors and
float32 for everything else; the ``vllm`` backend (``vllm_haq.vllm.evaluate``)
scores the same windows through the served model.
"""

from __future__ import annotations

import json
import math
import os

import torch

from offline.calib import eval_windows, load_documents, tokenize_documents
from offline.models import LayerTensors, global_tensor_names, log_softmax_nll, spec_for
from offline.source import SafetensorsCheckpoint


def eval_token_windows(model_dir: str, dataset: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] token windows of ``dataset`` (file or HF dataset name) with the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return eval_windows(tokenize_documents(tok, load_documents(dataset, "eval")), seq_len, max_windows)


def hf_token_nll(model_dir: str, windows: torch.Tensor, batch: int = 8, progress=None) -> torch.Tensor:
    """Per-token NLL [n, seq_len - 1] from the pure-PyTorch forward of ``model_dir``.

    ``progress(windows, passes)`` is called after every batch: ``windows`` of them went through one more of the
    ``passes`` (each decoder layer, then the head), layer by layer.
    """
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    spec = spec_for(config, os.path.join(model_dir, "config.json"))
    src = SafetensorsCheckpoint(model_dir)
    g = {n: src.get(n) for n in global_tensor_names(spec, src.names())}
    passes = spec.num_layers + 1

    def step(out: torch.Tensor) -> torch.Tensor:
        if progress is not None:
            progress(out.shape[0], passes)
        return out

    with torch.no_grad():
        hidden = spec.embed(g, windows)
        for i in range(spec.num_layers):
            lt = LayerTensors(src.load_prefix(spec.layer_prefix(i)))
            hidden = torch.cat([step(spec.layer_forward(i, lt, hidden[s : s + batch]))
                                for s in range(0, len(hidden), batch)])
            del lt
        return torch.cat([
            step(log_softmax_nll(spec.head(g, hidden[s : s + batch]), windows[s : s + batch]))
            for s in range(0, len(hidden), batch)
        ])


def summarize(nll: torch.Tensor, **fields) -> dict:
    """The JSON line ``haq eval`` prints."""
    mean = float(nll.double().mean())
    return {**fields, "windows": int(nll.shape[0]), "tokens": int(nll.numel()), "nll": mean, "ppl": math.exp(mean)}


def is_quantized_checkpoint(model_dir: str) -> bool:
    with open(os.path.join(model_dir, "config.json")) as f:
        return "quantization_config" in json.load(f)
