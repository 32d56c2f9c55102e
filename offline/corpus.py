"""Calibration and evaluation text: local files or Hugging Face datasets.

Local files: ``.txt`` (documents separated by blank lines) or ``.jsonl``
(one JSON object per line with a ``text`` field). Names ``wikitext2``, ``c4``
and ``pile`` load the real datasets through Hugging Face ``datasets`` (network
needed); these machines have none, so tests use local files.
"""

from __future__ import annotations

import json
import os

import torch

from vllm_haq.errors import HAQError

HF_DATASETS = {
    # name: (path, config, split for calibration, split for evaluation, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    "pile": ("monology/pile-uncopyrighted", None, "train", "test", "text"),
}


class CalibrationError(HAQError, ValueError):
    """Calibration or evaluation text is missing, unreadable or too short."""


def load_documents(source: str, split: str = "calib") -> list[str]:
    """Documents of a local file or a named Hugging Face dataset (``split``: calib|eval)."""
    if source in HF_DATASETS:
        return _load_hf(source, split)
    if not os.path.exists(source):
        raise CalibrationError(f"{source}: no such file (and not one of {sorted(HF_DATASETS)})")
    try:
        with open(source, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{source}: cannot read as UTF-8 text ({exc})") from exc
    if source.endswith(".jsonl"):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise CalibrationError(f"{source}:{n}: expected a JSON object with a 'text' field ({exc})") from exc
    else:
        docs = [d.strip() for d in raw.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise CalibrationError(f"{source}: contains no text")
    return docs


def _load_hf(name: str, split: str) -> list[str]:
    path, config, calib_split, eval_split, field = HF_DATASETS[name]
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(f"--calib {name} needs the 'datasets' package (pip install datasets)") from exc
    try:
        kwargs = {"streaming": True} if name in ("c4", "pile") else {}
        ds = datasets.load_dataset(path, config, split=calib_split if split == "calib" else eval_split, **kwargs)
    except Exception as exc:  # network, hub and dataset-script errors all land here
        raise CalibrationError(
            f"could not load dataset {name!r} ({path}) from the Hugging Face hub: {exc}. "
            f"Offline? Pass a local text file instead."
        ) from exc
    docs = []
    for row in ds:
        text = row[field].strip()
        if text:
            docs.append(text)
        if name in ("c4", "pile") and len(docs) >= 20000:
            break
    return docs


def tokenize_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long 1-D token stream: documents joined by blank lines (GPTQ's protocol)."""
    tokenizer.model_max_length = 1 << 62  # one long stream on purpose: no "sequence too long" warning
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batch(tokens: torch.Tensor, samples: int, seq_len: int, seed: int, source: str) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens, deterministic in ``seed``: [samples, seq_len]."""
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"--samples must be >= 1 and --seq-len >= 2 (got {samples}, {seq_len})")
    if tokens.numel() < seq_len + 1:
        raise CalibrationError(
            f"{source}: calibration text has {tokens.numel()} tokens, need at least --seq-len + 1 = {seq_len + 1}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len``, remainder dropped (GPTQ's perplexity protocol)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise CalibrationError(f"evaluation text has {tokens.numel()} tokens, fewer than --seq-len {seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)
