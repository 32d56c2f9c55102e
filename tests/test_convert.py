"""haq convert: output layout, routing statistics, determinism, resume and refusals."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from offline.corpus import CalibrationError
from offline.convert import ConvertError, ConvertOptions, convert
from offline.models import spec_for
from offline.source import SourceError
from tiny_models import FAMILIES
from vllm_haq.format import ROUTING_FILE, validate_checkpoint


def _all_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f != ROUTING_FILE:
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_layout(family, tiny_dir, haq_dir):
    src, out = tiny_dir(family), haq_dir(family)
    qcfg = validate_checkpoint(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    spec = spec_for(cfg)
    assert cfg["quantization_config"]["quant_method"] == "haq" and cfg["quantization_config"]["format_version"] == 1
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    t = _all_tensors(out)
    assert set(index) == set(t)
    orig = load_file(os.path.join(src, "model.safetensors"))
    for i in range(spec.num_layers):
        for m in spec.linear_modules(i):
            name = spec.layer_prefix(i) + m
            assert t[name + ".weight"].dtype == torch.int8
            assert t[name + ".weight_scale"].shape == (t[name + ".weight"].shape[0], 1)
            deq = t[name + ".weight"].float() * t[name + ".weight_scale"]
            err = float((deq - orig[name + ".weight"].float()).abs().max())
            assert err <= float(t[name + ".weight_scale"].max()) / 2 + 1e-6
    for name, v in orig.items():  # everything else is copied unchanged (embeddings, norms, router, biases)
        if not name.endswith(".weight") or name[: -len(".weight")] not in {
            spec.layer_prefix(i) + m for i in range(spec.num_layers) for m in spec.linear_modules(i)
        }:
            assert torch.equal(t[name], v), name
    assert (qcfg.routing_statistics == ROUTING_FILE) == (family in ("mixtral", "qwen2_moe"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_routing_statistics_are_consistent(family, haq_dir):
    out = haq_dir(family)
    cfg = json.load(open(os.path.join(out, "config.json")))
    spec = spec_for(cfg)
    stats = load_file(os.path.join(out, ROUTING_FILE))
    with safe_open(os.path.join(out, ROUTING_FILE), "pt") as f:
        tokens = json.loads(f.metadata()["haq_routing"])["tokens"]
    assert tokens == 4 * 64  # samples * seq_len
    counts, trans = stats["expert_counts"], stats["transition_counts"]
    assert counts.shape == (spec.num_layers, spec.num_experts)
    assert (counts.sum(1) == tokens * spec.top_k).all()  # every token routes to top_k experts per layer
    assert (trans.sum((1, 2)) == tokens * spec.top_k**2).all()
    assert torch.equal(trans.sum(2), counts[:-1] * spec.top_k)  # marginals of transitions = counts
    assert torch.equal(trans.sum(1), counts[1:] * spec.top_k)
    assert counts.max() > counts.float().mean()  # the router is not uniform


def test_conversion_is_deterministic(tiny_dir, calib_file, haq_dir, tmp_path):
    out = str(tmp_path / "again")
    convert(tiny_dir("mixtral"), out, ConvertOptions(method="rtn", calib=[calib_file], samples=4, seq_len=64))
    a, b = _all_tensors(out), _all_tensors(haq_dir("mixtral"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_conversion_resumes_to_identical_output(tiny_dir, calib_file, haq_dir, tmp_path):
    out = str(tmp_path / "resumed")
    opts = ConvertOptions(method="rtn", calib=[calib_file], samples=4, seq_len=64)
    calls = {"n": 0}

    def crash_after_first_layer(rep, total):
        calls["n"] += 1
        raise KeyboardInterrupt  # as if the process died after layer 0 was committed

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dir("mixtral"), out, opts, progress=crash_after_first_layer)
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")
    with pytest.raises(ConvertError, match="--resume"):
        convert(tiny_dir("mixtral"), out, opts)
    with pytest.raises(ConvertError, match="different model or options"):
        convert(tiny_dir("mixtral"), out,
                ConvertOptions(method="rtn", calib=[calib_file], samples=5, seq_len=64, resume=True))
    layers = []
    convert(tiny_dir("mixtral"), out,
            ConvertOptions(method="rtn", calib=[calib_file], samples=4, seq_len=64, resume=True),
            progress=lambda rep, total: layers.append(rep.index))
    assert layers == [1]  # only the unfinished layer ran again
    assert not os.path.exists(out + ".partial")
    a, b = _all_tensors(out), _all_tensors(haq_dir("mixtral"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    routing = open(os.path.join(out, ROUTING_FILE), "rb").read()
    assert routing == open(os.path.join(haq_dir("mixtral"), ROUTING_FILE), "rb").read()


def test_refusals_name_the_cause(tiny_dir, calib_file, haq_dir, tmp_path):
    with pytest.raises(ConvertError, match="already exists"):
        convert(tiny_dir("opt"), haq_dir("opt"), ConvertOptions(method="rtn"))
    with pytest.raises(ConvertError, match="routing statistics need calibration"):
        convert(tiny_dir("mixtral"), str(tmp_path / "x"), ConvertOptions(method="rtn"))
    with pytest.raises(ConvertError, match="already quantized"):
        convert(haq_dir("opt"), str(tmp_path / "y"), ConvertOptions(method="rtn"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CalibrationError, match="need at least"):
        convert(tiny_dir("mixtral"), str(tmp_path / "z"), ConvertOptions(method="rtn", calib=[str(short)], seq_len=64))
    with pytest.raises(CalibrationError, match="no such file"):
        convert(tiny_dir("mixtral"), str(tmp_path / "z"),
                ConvertOptions(method="rtn", calib=[str(tmp_path / "nope.txt")]))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir("llama"), broken)
    t = load_file(str(broken / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(t, str(broken / "model.safetensors"))
    with pytest.raises(SourceError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has non-finite"):
        convert(str(broken), str(tmp_path / "w"), ConvertOptions(method="rtn"))
    assert not os.path.exists(tmp_path / "w")


def test_hf_eval_kl_matches_transformers(tiny_dir, calib_file, tmp_path, capsys):
    """haq eval --reference: the mean per-token KL(reference || model) equals the one computed from transformers'
    logits of the two models (a second tiny llama with other weights), and is 0 for a model against itself."""
    from transformers import AutoModelForCausalLM

    from offline.cli import main
    from offline.perplexity import eval_token_windows
    from tiny_models import build_tiny_model

    ref, other = tiny_dir("llama"), build_tiny_model("llama", str(tmp_path / "other"), seed=1)
    ev = ["--dataset", calib_file, "--backend", "hf", "--seq-len", "32", "--max-windows", "3", "--reference", ref]
    assert main(["eval", other, *ev]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    windows = eval_token_windows(other, calib_file, 32, 3)
    with torch.no_grad():
        lp_ref, lp = (torch.log_softmax(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(windows)
                                        .logits[:, :-1].double(), -1) for d in (ref, other))
    expected = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    assert expected > 0.05 and line["kl"] == pytest.approx(expected, rel=1e-3)
    assert line["reference"] == os.path.abspath(ref)
    assert main(["eval", ref, *ev]) == 0
    assert abs(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kl"]) < 1e-6
    with pytest.raises(SystemExit, match="--reference needs --backend hf"):
        main(["eval", ref, *ev[:2], "--reference", ref])


def test_cli_convert_and_hf_eval(tiny_dir, calib_file, tmp_path, capsys):
    from offline.cli import main

    out = str(tmp_path / "cli")
    assert main(["convert", tiny_dir("llama"), out, "--method", "rtn", "--calib", calib_file,
                 "--samples", "2", "--seq-len", "32"]) == 0
    assert main(["eval", out, "--dataset", calib_file, "--backend", "hf", "--seq-len", "32", "--max-windows", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["windows"] == 3 and line["tokens"] == 3 * 31 and 1 < line["ppl"] < 1e5
    assert main(["convert", tiny_dir("llama"), out, "--method", "rtn"]) == 1  # exists -> one-line error, exit 1
    assert "already exists" in capsys.readouterr().err
    out2 = str(tmp_path / "cli-haq")
    assert main(["convert", tiny_dir("llama"), out2, "--calib", calib_file, "--samples", "2", "--seq-len", "32",
                 "--method", "haq", "--alpha", "0.6", "--gptq-block-size", "64", "--gptq-dampening", "0.02",
                 "--no-act-order"]) == 0
    producer = json.load(open(os.path.join(out2, "config.json")))["quantization_config"]["producer"]
    assert producer["method"] == "haq" and producer["alpha"] == 0.6
    assert producer["gptq"] == {"block_size": 64, "dampening": 0.02, "act_order": False}
    assert main(["convert", tiny_dir("llama"), str(tmp_path / "x"), "--method", "gptq"]) == 1
    assert "--method gptq calibrates on text" in capsys.readouterr().err
    # the default method is haq: without calibration text the error says so and names the data-free way
    assert main(["convert", tiny_dir("llama"), str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "--method haq (the default) calibrates on text" in err and "--method rtn" in err
    assert not os.path.exists(str(tmp_path / "d")) and not os.path.exists(str(tmp_path / "d.partial"))


def test_full_disk_fails_with_one_line_cause_and_keeps_finished_layers(tiny_dir, calib_file, haq_dir, tmp_path,
                                                                       monkeypatch):
    import errno

    import offline.convert as convert_module

    out = str(tmp_path / "full")
    opts = ConvertOptions(method="rtn", calib=[calib_file], samples=4, seq_len=64)
    real_save, calls = convert_module._save_atomic, {"n": 0}

    def save_until_full(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the globals shard and layer 0 are written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
        real_save(tensors, path)

    monkeypatch.setattr(convert_module, "_save_atomic", save_until_full)
    with pytest.raises(ConvertError) as err:
        convert(tiny_dir("mixtral"), out, opts)
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device" in msg and "rerun with --resume" in msg, msg
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")
    monkeypatch.setattr(convert_module, "_save_atomic", real_save)
    convert(tiny_dir("mixtral"), out,
            ConvertOptions(method="rtn", calib=[calib_file], samples=4, seq_len=64, resume=True))
    a, b = _all_tensors(out), _all_tensors(haq_dir("mixtral"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unwritable_output_location_is_one_line(tiny_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConvertError, match=r"cannot create the work directory .*parent exists and is writable"):
        convert(tiny_dir("opt"), str(blocker / "out"), ConvertOptions(method="rtn"))
