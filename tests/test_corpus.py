"""--calib through Hugging Face ``datasets`` (offline.corpus): local files with the packaged builders, a local
dataset directory standing in for a hub id, split / field / chat template, the errors naming the option at fault,
and a real conversion whose producer record names its datasets source. No network: HF_DATASETS_OFFLINE=1 and a
cache under tmp_path."""

import json
import os
import shutil

import pytest

pytest.importorskip("datasets")

from conftest import shared_path  # noqa: E402

from offline.corpus import CalibrationError, load_documents, resolve_source, source_label  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven is prime."}],
]


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """No hub: datasets offline, its cache in tmp_path."""
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_files_through_the_packaged_builders(tmp_path):
    import pandas as pd

    pd.DataFrame({"body": ["first document", "  second  ", ""], "n": [1, 2, 3]}).to_parquet(tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), field="body") == ["first document", "second"]
    pd.DataFrame({"text": ["csv one", "csv two"]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": ["csv three"]}).to_csv(tmp_path / "b.csv", index=False)
    assert sorted(load_documents(f"hf:csv:{tmp_path}/*.csv")) == ["csv one", "csv three", "csv two"]
    rows = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p one", "text": "t one"}, {"prompt": "p two", "text": "t two"}])
    assert load_documents(f"hf:json:{rows}") == ["t one", "t two"]  # default field: text
    assert load_documents(f"hf:json:{rows}", field="prompt") == ["p one", "p two"]
    assert load_documents(rows, field="prompt") == ["p one", "p two"]  # .jsonl read natively honours the field too
    assert source_label(f"hf:json:{rows}") == "hf:json:r.jsonl" and source_label(rows) == "r.jsonl"


def test_a_local_dataset_directory_stands_in_for_a_hub_id(tmp_path):
    """hf:ID loads what load_dataset(ID) loads: a directory with split files is a hub dataset's layout."""
    repo = tmp_path / "org" / "tiny-chat"
    repo.mkdir(parents=True)
    _jsonl(repo / "train.jsonl", [{"messages": c} for c in CHATS])
    _jsonl(repo / "test.jsonl", [{"messages": CHATS[0][:1]}])
    src = f"hf:{repo}"
    assert load_documents(src) == ["What is the capital of France?\nParis.", "Name a prime number.\nSeven is prime."]
    assert load_documents(src, data_split="test") == ["What is the capital of France?"]
    assert load_documents(src, "eval") == ["What is the capital of France?"]  # haq eval: split test by default
    assert source_label(src) == "hf:tiny-chat"
    with pytest.raises(CalibrationError, match=r"--calib hf:.*no split 'validation' \(--calib-split\).*train"):
        load_documents(src, data_split="validation")


def test_presets_are_hf_sources_and_errors_name_the_option(tmp_path):
    wiki = resolve_source("wikitext2")
    assert (wiki.path, wiki.config, wiki.split, wiki.field, wiki.streaming) == (
        "wikitext", "wikitext-2-raw-v1", "train", "text", False)
    assert resolve_source("wikitext2", "eval").split == "test" and resolve_source("c4").limit == 20000
    assert resolve_source("hf:allenai/c4:en", split="validation").config == "en"
    with pytest.raises(CalibrationError, match=r"--calib hf:no-such/dataset: could not load 'no-such/dataset'"):
        load_documents("hf:no-such/dataset")  # offline: the hub is not asked
    with pytest.raises(CalibrationError, match=r"--calib .*missing\.txt: no such file"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(CalibrationError, match=r"--calib hf:parquet:.*: no such file"):
        load_documents(f"hf:parquet:{tmp_path}/*.parquet")
    with pytest.raises(CalibrationError, match=r"the json builder needs data files: hf:json:PATH"):
        load_documents("hf:json")
    rows = _jsonl(tmp_path / "r.jsonl", [{"body": "x"}])
    with pytest.raises(CalibrationError, match=r"no field 'text' \(--calib-field\); the records have \['body'\]"):
        load_documents(f"hf:json:{rows}", field="text")
    with pytest.raises(CalibrationError, match=r"none of the fields .* name the text or messages field with "
                                               r"--calib-field"):
        load_documents(f"hf:json:{rows}")
    with pytest.raises(CalibrationError, match=r"--dataset hf:json:.*no field 'nope'"):
        load_documents(f"hf:json:{rows}", "eval", field="nope")
    nums = _jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    with pytest.raises(CalibrationError, match=r"record 0, field 'text' \(--calib-field\): expected text"):
        load_documents(f"hf:json:{nums}")


@pytest.fixture
def chat_model(tmp_path):
    """A copy of the shared tiny-opt (real tokenizer and weights) whose tokenizer_config.json has a chat_template."""
    src = shared_path("models", "tiny-opt")
    dst = tmp_path / "tiny-opt-chat"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg  # the shared models have none: the template is this test's
    cfg["chat_template"] = TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_chat_records_through_the_tokenizer_chat_template(chat_model, tmp_path):
    from transformers import AutoTokenizer

    from offline.convert import _chat_renderer

    tok = AutoTokenizer.from_pretrained(chat_model)
    render = _chat_renderer(tok, chat_model)
    sharegpt = [[{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c] for c in CHATS]
    rows = _jsonl(tmp_path / "chat.jsonl", [{"id": i, "conversations": c} for i, c in enumerate(sharegpt)])
    docs = load_documents(f"hf:json:{rows}", render_chat=render)
    assert docs[0] == ("<|user|>\nWhat is the capital of France?<|endoftext|>\n<|assistant|>\nParis.<|endoftext|>")
    assert docs == [tok.apply_chat_template(c, tokenize=False).strip() for c in CHATS]
    plain = AutoTokenizer.from_pretrained(shared_path("models", "tiny-opt"))
    with pytest.raises(CalibrationError, match=r"--calib-chat-template: the tokenizer of .* has no chat template"):
        _chat_renderer(plain, "tiny-opt")


def test_gptq_conversion_records_its_datasets_source(chat_model, tmp_path):
    """A real haq convert --method gptq on tiny-opt calibrated on chat records through the chat template."""
    import pandas as pd

    from offline.cli import main

    corpus = open(shared_path("data", "corpora", "wiki.train.txt"), encoding="utf-8").read().split("\n\n")[:200]
    chats = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a, b in zip(corpus, corpus[1:])]
    pd.DataFrame({"messages": chats}).to_parquet(tmp_path / "chats.parquet")
    out = tmp_path / "out"
    args = ["convert", chat_model, str(out), "--method", "gptq", "--calib", f"hf:parquet:{tmp_path}/chats.parquet",
            "--calib-split", "train", "--calib-field", "messages", "--calib-chat-template",
            "--samples", "4", "--seq-len", "32", "--no-progress"]
    assert main(args) == 0
    producer = json.loads((out / "config.json").read_text())["quantization_config"]["producer"]
    assert producer["calibration"] == ["hf:parquet:chats.parquet"]
    assert producer["calibration_options"] == {"split": "train", "field": "messages", "chat_template": True}
    assert os.path.exists(out / "model-00001-of-00003.safetensors") or any(out.glob("*.safetensors"))
