"""Calibration text tokenized in pieces (offline.token_pieces): the ids of tokenizing the joined text whole."""

from __future__ import annotations

import os

import pytest
from conftest import CORPORA, shared_path
from tiny_models import CORPUS, build_tokenizer

from offline.corpus import tokenize_documents
from offline.token_pieces import byte_level_bpe, encode_pieces, seam_pieces

SMOLLM2 = os.path.expanduser("~/.cache/vllm-haq/smollm2-135m-instruct-bf16")

# documents ending and starting in every way the seams have to handle: contractions cut off at the end, digits,
# punctuation, non-ASCII letters and symbols, trailing and leading whitespace (not stripped), special tokens,
# runs of newlines, an empty document
TRICKY = ["It's", "'s", "you'", "he'll", "1999", "end.", "x!?\u2026", "caf\u00e9", "\u4e2d\u6587", "\U0001f600",
          "trailing space ", " leading space", "\nnewline first", "tab\t", "<|endoftext|>", "a<|endoftext|>",
          "two\n\n\nthree", "", "'", " ", "\u00a0nbsp\u00a0", "\u2028sep", "ok"]


def _whole(tok, docs):
    tok.model_max_length = 1 << 62
    return tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]


def _tokenizers():
    from transformers import AutoTokenizer

    yield "tiny", AutoTokenizer.from_pretrained(_tiny_tokenizer_dir())
    opt = os.path.join(shared_path("models"), "tiny-opt")
    yield "opt", AutoTokenizer.from_pretrained(opt)
    if os.path.exists(SMOLLM2):
        yield "smollm2", AutoTokenizer.from_pretrained(SMOLLM2)


_TINY: list[str] = []


def _tiny_tokenizer_dir() -> str:
    if not _TINY:
        import tempfile

        path = tempfile.mkdtemp(prefix="haq-tok-")
        build_tokenizer(path)
        _TINY.append(path)
    return _TINY[0]


def test_pieces_join_to_the_text_and_cut_only_after_safe_characters():
    docs = ["a.", "b", "c ", "d\u2026", "e"]
    pieces = seam_pieces(docs)
    assert "".join(pieces) == "\n\n".join(docs)
    assert pieces == ["a.", "\n\nb", "\n\nc \n\nd\u2026\n\ne"]
    assert seam_pieces([]) == [""] and seam_pieces(["x"]) == ["x"]


def test_byte_level_bpe_tokenizers_give_the_whole_texts_ids():
    import itertools
    import random

    rng = random.Random(0)
    texts = [TRICKY, [CORPUS[i : i + 300] for i in range(0, len(CORPUS), 300)]]
    for _ in range(20):  # random documents cut from the corpus and the tricky ones, in random order
        texts.append([rng.choice(TRICKY) + CORPUS[rng.randrange(len(CORPUS)):][: rng.randrange(60)]
                      + rng.choice(TRICKY) for _ in range(rng.randrange(1, 12))])
    texts += [list(p) for p in itertools.permutations(["It", "'s", "12", "."])]
    for name, tok in _tokenizers():
        assert byte_level_bpe(tok) is not None, name
        for docs in texts:
            assert encode_pieces(tok, docs) == _whole(tok, docs), (name, docs)


def test_the_calibration_corpora_tokenize_to_the_same_ids():
    from transformers import AutoTokenizer

    if not os.path.exists(SMOLLM2):
        pytest.skip(f"needs {SMOLLM2} (make demo exports it)")
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    path = shared_path("data", "corpora", "wiki.valid.txt")
    docs = [d.strip() for d in open(path, encoding="utf-8").read().split("\n\n") if d.strip()]
    docs += [d.strip() for d in open(os.path.join(CORPORA, "sotu.valid.txt"), encoding="utf-8").read().split("\n\n")
             if d.strip()]
    assert len(seam_pieces(docs)) > 10
    assert tokenize_documents(tok, docs).tolist() == _whole(tok, docs)


def test_other_tokenizers_are_tokenized_whole(tmp_path):
    """A prefix space, a normalizer, dropout or an added token with whitespace could make a cut inexact."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    def variant(change):
        tok = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir())
        change(tok.backend_tokenizer)
        return tok

    changes = [lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
               lambda b: setattr(b, "normalizer", normalizers.NFKC()),
               lambda b: setattr(b.model, "dropout", 0.1),
               lambda b: b.add_tokens([AddedToken("a\nb")]),
               lambda b: b.add_tokens([AddedToken("zz", rstrip=True)]),
               lambda b: b.enable_truncation(16)]
    for change in changes:
        tok = variant(change)
        assert byte_level_bpe(tok) is None
        assert encode_pieces(tok, ["a.", "b"]) is None
    docs = ["one two.", "three"]
    tok = variant(changes[0])
    assert tokenize_documents(tok, docs).tolist() == _whole(tok, docs)
