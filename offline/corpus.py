"""Calibration and evaluation text: local files or Hugging Face ``datasets`` sources.

A source (one ``--calib`` / ``--dataset`` word) is one of:

* a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON object per line, the
  text in its ``text`` field or ``--calib-field``), read without ``datasets``;
* a local ``.json`` / ``.csv`` / ``.parquet`` / ``.arrow`` file, read through ``datasets``' packaged builder of
  that name (``data_files=`` the file);
* ``hf:ID[:CONFIG]``: anything ``datasets.load_dataset(ID, CONFIG)`` loads — a hub id (network or a populated
  cache with ``HF_DATASETS_OFFLINE=1``), a local dataset directory or script. For the packaged builders
  (``json``, ``csv``, ``parquet``, ``text``, ``arrow``), which have no named configs, the part after the colon
  is ``data_files`` (a path or glob): ``hf:parquet:data/*.parquet``;
* a preset name, ``wikitext2``, ``c4`` or ``pile``: shorthands for ``hf:`` sources with their config, splits
  and field (network needed; c4 and pile are streamed and cut at 20000 documents).

``datasets`` sources read split ``--calib-split`` (default: the preset's, else ``train``; ``test`` for
evaluation) and field ``--calib-field`` (default: the first of ``text``, ``messages``, ``conversations`` the
records have). A field holding a conversation (a list of ``{"role", "content"}`` or ShareGPT
``{"from", "value"}`` messages) becomes one document: the tokenizer's chat template applied to it with
``--calib-chat-template``, else its messages' contents joined by newlines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_haq.errors import HAQError

# name: (path, config, split for calibration, split for evaluation, text field)
HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    "pile": ("monology/pile-uncopyrighted", None, "train", "test", "text"),
}
STREAMED_LIMIT = 20000  # documents read from a streamed preset (c4, pile)
BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' packaged builders: ID:DATA_FILES
FILE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FIELDS = ("text", "messages", "conversations")  # tried in this order when no --calib-field is given
_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT "from" values


class CalibrationError(HAQError, ValueError):
    """Calibration or evaluation text is missing, unreadable or too short."""


@dataclass(frozen=True)
class DatasetSource:
    """One ``datasets`` source resolved from a ``--calib`` word: what ``load_dataset`` is called with."""

    source: str  # the word as given
    path: str
    config: str | None = None
    data_files: str | None = None
    split: str = "train"
    field: str | None = None
    streaming: bool = False
    limit: int | None = None


def resolve_source(source: str, purpose: str = "calib", split: str | None = None,
                   field: str | None = None) -> DatasetSource | None:
    """The ``datasets`` source ``source`` names (``purpose``: calib|eval), or None for a natively read .txt/.jsonl
    file. Checks what can be checked without loading: the syntax and that local files exist."""
    option = "--calib" if purpose == "calib" else "--dataset"
    if source in HF_DATASETS:
        path, config, calib_split, eval_split, text = HF_DATASETS[source]
        streamed = source in ("c4", "pile")
        return DatasetSource(source, path, config, None, split or (calib_split if purpose == "calib" else eval_split),
                             field or text, streamed, STREAMED_LIMIT if streamed else None)
    default_split = split or ("train" if purpose == "calib" else "test")
    if source.startswith("hf:"):
        path, _, rest = source[3:].partition(":")
        if not path:
            raise CalibrationError(f"{option} {source}: expected hf:ID[:CONFIG] (a dataset id, directory or builder)")
        if path in BUILDERS:
            if not rest:
                raise CalibrationError(f"{option} {source}: the {path} builder needs data files: hf:{path}:PATH")
            _check_files(rest, source, option)
            return DatasetSource(source, path, None, rest, split or "train", field)  # data files: one split
        return DatasetSource(source, path, rest or None, None, default_split, field)
    if not os.path.exists(source):
        raise CalibrationError(f"{option} {source}: no such file (nor hf:ID[:CONFIG], nor one of "
                               f"{sorted(HF_DATASETS)})")
    builder = FILE_BUILDERS.get(os.path.splitext(source)[1].lower())
    if builder:
        return DatasetSource(source, builder, None, source, split or "train", field)
    return None


def _check_files(pattern: str, source: str, option: str) -> None:
    import glob

    if not glob.glob(pattern):
        raise CalibrationError(f"{option} {source}: no such file: {pattern}")


def source_label(source: str) -> str:
    """How a source is recorded in a checkpoint's producer block: local files by name (not path)."""
    if source.startswith("hf:"):
        path, sep, rest = source[3:].partition(":")
        if path in BUILDERS and sep:
            return f"hf:{path}:{os.path.basename(rest)}"
        return f"hf:{os.path.basename(path.rstrip('/'))}{sep}{rest}" if os.path.exists(path) else source
    return source if source in HF_DATASETS else os.path.basename(source)


def load_documents(source: str, split: str = "calib", *, data_split: str | None = None, field: str | None = None,
                   render_chat: Callable[[list[dict]], str] | None = None) -> list[str]:
    """Documents of one source (see the module doc; ``split``: calib|eval). ``data_split`` and ``field`` are
    ``--calib-split`` / ``--calib-field``; ``render_chat`` turns a conversation into text (the chat template)."""
    ds = resolve_source(source, split, data_split, field)
    if ds is not None:
        docs = _load_dataset(ds, "--calib" if split == "calib" else "--dataset", render_chat)
    else:
        docs = _read_file(source, field, render_chat)
    docs = [d for d in docs if d]
    if not docs:
        raise CalibrationError(f"{source}: contains no text")
    return docs


def _read_file(source: str, field: str | None, render_chat) -> list[str]:
    try:
        with open(source, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{source}: cannot read as UTF-8 text ({exc})") from exc
    if not source.endswith(".jsonl"):
        return [d.strip() for d in raw.split("\n\n")]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(_document(row[field or _pick_field(list(row), None, source)], render_chat))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationError(
                f"{source}:{n}: expected a JSON object with a {field or 'text'!r} field"
                f"{' (--calib-field)' if field else ''} holding text or messages ({exc})") from exc
    return docs


def _load_dataset(ds: DatasetSource, option: str, render_chat) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(f"{option} {ds.source} needs the 'datasets' package (pip install datasets)") from exc
    kwargs = {"data_files": ds.data_files} if ds.data_files else {}
    try:
        data = datasets.load_dataset(ds.path, ds.config, split=ds.split, streaming=ds.streaming, **kwargs)
    except Exception as exc:  # network, hub, missing file, unknown split and dataset-script errors all land here
        if "split" in str(exc).lower():
            hint = " (--calib-split)" if option == "--calib" else ""
            raise CalibrationError(f"{option} {ds.source}: no split {ds.split!r}{hint}: "
                                   f"{str(exc).rstrip('.')}") from exc
        config = f" config {ds.config!r}" if ds.config else ""
        raise CalibrationError(f"{option} {ds.source}: could not load {ds.path!r}{config}: {exc}. Offline? Pass a "
                               f"local file, or set HF_DATASETS_OFFLINE=1 with the dataset cached.") from exc
    columns = list(data.column_names or [])
    name = _pick_field(columns, ds.field, f"{option} {ds.source}")
    docs = []
    for n, row in enumerate(data):
        try:
            doc = _document(row[name], render_chat)
        except TypeError as exc:
            raise CalibrationError(f"{option} {ds.source}: record {n}, field {name!r} (--calib-field): {exc}") from exc
        if doc:
            docs.append(doc)
        if ds.limit and len(docs) >= ds.limit:
            break
    return docs


def _pick_field(columns: list[str], field: str | None, where: str) -> str:
    if field is not None:
        if columns and field not in columns:
            raise CalibrationError(f"{where}: no field {field!r} (--calib-field); the records have {columns}")
        return field
    for name in FIELDS:
        if name in columns:
            return name
    raise CalibrationError(f"{where}: none of the fields {list(FIELDS)}; the records have {columns}: "
                           f"name the text or messages field with --calib-field")


def _document(value, render_chat) -> str:
    """One document from a field's value: text as is (stripped), a conversation rendered."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        messages = [{"role": _ROLES.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                     "content": m.get("content", m.get("value"))} for m in value]
        if render_chat is not None:
            return render_chat(messages).strip()
        return "\n".join(str(m["content"]) for m in messages if m["content"]).strip()
    raise TypeError(f"expected text or a list of messages, got {type(value).__name__}")


def tokenize_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long 1-D token stream: documents joined by blank lines (GPTQ's protocol).

    Where the tokenizer splits its input the way GPT-2's byte-level BPE does (:func:`offline.token_pieces.
    seam_pieces`), the joined text is encoded as pieces cut before the blank lines, in parallel: the same ids
    (tests/test_token_pieces.py), without one 12 MB string through the tokenizer (6 s of a SmolLM2 conversion)."""
    from offline.token_pieces import encode_pieces

    ids = encode_pieces(tokenizer, docs)
    if ids is None:
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
