"""Perplexity with GPTQ's protocol, and the pure-PyTorch (``hf``) backend.

Protocol: the evaluation documents are joined by blank lines, tokenized once,
cut into non-overlapping windows of ``seq_len`` tokens (remainder dropped);
every token of a window but the first is scored given its prefix in the
window; perplexity = exp(mean negative log-likelihood).

The ``hf`` backend runs :mod:`offline.models` layer by layer (one decoder layer
in memory at a time) with exactly HAQ's int8 arithmetic for int8 tensors and
float32 for everything else; the ``vllm`` backend (``vllm_haq.vllm.scoring``)
scores the same windows through the served model. With a reference model the
``hf`` backend also gives the per-token KL divergence to it (``haq eval --reference``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from offline.corpus import eval_windows, load_documents, tokenize_documents
from offline.models import LayerTensors, ModelSpec, global_tensor_names, layer_rotations, spec_for
from offline.source import SafetensorsCheckpoint


def eval_token_windows(model_dir: str, dataset: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] token windows of ``dataset`` (file or HF dataset name) with the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return eval_windows(tokenize_documents(tok, load_documents(dataset, "eval")), seq_len, max_windows)


@dataclass
class FinalHidden:
    """The last decoder layer's output for some windows, with what is needed to apply the model's head."""

    spec: ModelSpec
    globals: dict[str, torch.Tensor]
    hidden: torch.Tensor
    model_dir: str


def hf_final_hidden(model_dir: str, windows: torch.Tensor, batch: int = 8, progress=None) -> FinalHidden:
    """Run the decoder layers of ``model_dir`` on ``windows`` (one layer in memory at a time).

    ``progress(windows, passes)`` is called after every batch: ``windows`` of them went through one more of the
    ``passes`` (each decoder layer, then the head), layer by layer.
    """
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    spec = spec_for(config, os.path.join(model_dir, "config.json"))
    src = SafetensorsCheckpoint(model_dir)
    g = {n: src.get(n) for n in global_tensor_names(spec, src.names())}
    passes = spec.num_layers + 1
    with torch.no_grad():
        hidden = spec.embed(g, windows)
        for i in range(spec.num_layers):
            prefix = spec.layer_prefix(i)
            lt = LayerTensors(src.load_prefix(prefix), rotations=layer_rotations(config, prefix))
            parts = []
            for s in range(0, len(hidden), batch):
                parts.append(spec.layer_forward(i, lt, hidden[s : s + batch]))
                if progress is not None:
                    progress(parts[-1].shape[0], passes)
            hidden = torch.cat(parts)
            del lt, parts
    return FinalHidden(spec, g, hidden, model_dir)


def hf_token_nll(model_dir: str, windows: torch.Tensor, batch: int = 8, progress=None) -> torch.Tensor:
    """Per-token NLL [n, seq_len - 1] from the pure-PyTorch forward of ``model_dir`` (``progress``: as
    :func:`hf_final_hidden`'s)."""
    return hf_token_nll_kl(model_dir, windows, None, batch, progress)[0]


def hf_token_nll_kl(model_dir: str, windows: torch.Tensor, reference: FinalHidden | None, batch: int = 8,
                    progress=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token NLL [n, seq_len - 1] of ``model_dir`` and, given ``reference`` (the original model's
    :func:`hf_final_hidden` on the same windows), the per-token KL(reference ‖ model) in nats.

    KL compares whole next-token distributions at every position. A perplexity difference of a few tenths of a
    percent mostly says whether the small shift a quantization makes happens to favour the evaluated text's
    tokens; KL measures the shift itself, so it ranks methods with far less noise.
    """
    if reference is not None and tuple(reference.hidden.shape[:2]) != tuple(windows.shape):
        raise ValueError(f"reference {reference.model_dir}: its hidden states are for windows "
                         f"{tuple(reference.hidden.shape[:2])}, not {tuple(windows.shape)}")
    state = hf_final_hidden(model_dir, windows, batch, progress)
    nll, kl = [], []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            lp = torch.log_softmax(state.spec.head(state.globals, state.hidden[s : s + batch])[:, :-1].float(), -1)
            nll.append(-lp.gather(-1, windows[s : s + batch, 1:].unsqueeze(-1)).squeeze(-1))
            if reference is not None:
                ref = reference.spec.head(reference.globals, reference.hidden[s : s + batch])[:, :-1].float()
                if ref.shape[-1] != lp.shape[-1]:
                    raise ValueError(f"reference {reference.model_dir} has {ref.shape[-1]} logits per token, "
                                     f"{model_dir} {lp.shape[-1]}: not the same vocabulary")
                ref = torch.log_softmax(ref, -1)
                kl.append((ref.exp() * (ref - lp)).sum(-1))
            if progress is not None:
                progress(lp.shape[0], state.spec.num_layers + 1)
    return torch.cat(nll), (torch.cat(kl) if kl else None)


def summarize(nll: torch.Tensor, **fields) -> dict:
    """The JSON line ``haq eval`` prints."""
    mean = float(nll.double().mean())
    return {**fields, "windows": int(nll.shape[0]), "tokens": int(nll.numel()), "nll": mean, "ppl": math.exp(mean)}


