"""Conversion recipes (offline.recipe), ``haq convert --recipe`` and the Python API (``offline.convert_model``).

The promise under test: the recipe a conversion writes into its output directory converts the same model into the
same files, byte for byte; a recipe's errors name the file and the key; the command line's flags and the API's
keywords override a recipe; the API and the command line make the same checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from conftest import shared_path
from offline import RECIPE_FILE, ConvertError, ConvertOptions, RecipeError, build_options, convert_model
from offline.recipe import dump_recipe, load_recipe, recipe_dict, recipe_fields


def _files(d: str) -> dict[str, bytes]:
    """Relative path -> content of every file under ``d`` (the checkpoints hold no logs)."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, d)] = open(path, "rb").read()
    return out


def _same_files(a: str, b: str) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert [n for n in fa if fa[n] != fb[n]] == []


def _write(path, doc) -> str:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def test_written_recipe_reproduces_a_tiny_mixtral_conversion_byte_for_byte(tmp_path, monkeypatch, capsys):
    """haq (the default: per-layer search, GPTQ, rotation search, routing statistics) on a trained MoE, calibrated
    on a path given relative to the current directory: the recipe records it as given and, run from the same
    directory, reproduces every file."""
    from offline.cli import main

    model = shared_path("models", "tiny-mixtral")
    monkeypatch.chdir(shared_path("data", "corpora"))
    out1, out2 = str(tmp_path / "flags"), str(tmp_path / "recipe")
    assert main(["convert", model, out1, "--calib", "wiki.train.txt", "--samples", "8", "--seq-len", "64",
                 "--seed", "3", "--gptq-block-size", "64", "--no-act-order", "--no-progress"]) == 0
    assert f"its options: {os.path.join(out1, RECIPE_FILE)}" in capsys.readouterr().err
    recipe = yaml.safe_load(open(os.path.join(out1, RECIPE_FILE)))
    assert recipe["haq_recipe"] == 1 and recipe["method"] == "haq" and recipe["format"] == "haq"
    assert recipe["calibration"] == {"dataset": ["wiki.train.txt"], "split": None, "field": None,
                                     "chat_template": False, "samples": 8, "seq_len": 64, "seed": 3,
                                     "routing_stats": True, "batch_size": 8}
    assert recipe["gptq"] == {"block_size": 64, "dampening": 0.01, "act_order": False}
    assert main(["convert", model, out2, "--recipe", os.path.join(out1, RECIPE_FILE), "--no-progress"]) == 0
    _same_files(out1, out2)  # config.json (its producer records the corpus by name), shards, routing, recipe


def test_flags_override_the_recipe_and_dry_run_reads_it(tiny_dir, calib_file, tmp_path, capsys):
    from offline.cli import main

    model = tiny_dir("llama")
    recipe = _write(tmp_path / "r.yaml", {"method": "smoothquant", "smoothing": {"alpha": 0.6},
                                          "calibration": {"dataset": calib_file, "samples": 4, "seq_len": 32}})
    out = str(tmp_path / "out")
    assert main(["convert", model, out, "--recipe", recipe, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "smoothquant" and not os.path.exists(out)
    assert main(["convert", model, out, "--recipe", recipe, "--samples", "2", "--alpha", "0.7", "--no-progress"]) == 0
    written = load_recipe(os.path.join(out, RECIPE_FILE))
    assert (written["method"], written["alpha"], written["samples"], written["seq_len"]) == ("smoothquant", 0.7, 2, 32)
    producer = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["producer"]
    assert (producer["method"], producer["alpha"], producer["samples"]) == ("smoothquant", 0.7, 2)
    # the same options as flags alone make the same files
    again = str(tmp_path / "flags")
    assert main(["convert", model, again, "--method", "smoothquant", "--alpha", "0.7", "--calib", calib_file,
                 "--samples", "2", "--seq-len", "32", "--no-progress"]) == 0
    _same_files(out, again)


def test_python_api_with_dict_path_and_options_recipes(tiny_dir, calib_file, tmp_path):
    """convert_model with a dict recipe and dataset=, then with the written recipe's path, then with
    ConvertOptions: the same files as haq convert with the same flags; keywords override the recipe."""
    from offline.cli import main

    model = tiny_dir("mixtral")
    recipe = {"haq_recipe": 1, "method": "gptq", "calibration": {"samples": 4, "seq_len": 32, "seed": 1}}
    out1 = convert_model(model, tmp_path / "dict", recipe=recipe, dataset=calib_file)
    assert out1 == str(tmp_path / "dict") and os.path.isfile(os.path.join(out1, RECIPE_FILE))
    out2 = convert_model(model, str(tmp_path / "path"), recipe=os.path.join(out1, RECIPE_FILE))
    _same_files(out1, out2)
    cli = str(tmp_path / "cli")
    assert main(["convert", model, cli, "--method", "gptq", "--calib", calib_file, "--samples", "4", "--seq-len",
                 "32", "--seed", "1", "--no-progress"]) == 0
    _same_files(out1, cli)
    opts = ConvertOptions(method="gptq", calib=[calib_file], samples=4, seq_len=32, seed=1)
    _same_files(out1, convert_model(model, tmp_path / "opts", recipe=opts))
    out3 = convert_model(model, tmp_path / "kw", recipe=os.path.join(out1, RECIPE_FILE), seed=2, method="rtn")
    assert (load_recipe(os.path.join(out3, RECIPE_FILE))["seed"], load_recipe(os.path.join(out3, RECIPE_FILE))
            ["method"]) == (2, "rtn")
    with pytest.raises(ConvertError, match="already exists"):
        convert_model(model, out1, recipe=recipe, dataset=calib_file)
    assert convert_model(model, out1, recipe=recipe, dataset=calib_file, overwrite=True) == out1


def test_compressed_tensors_output_carries_its_recipe(tiny_dir, tmp_path):
    """--format compressed-tensors from a recipe (JSON here): the export holds the recipe, which reproduces it;
    haq export of a HAQ checkpoint leaves the HAQ checkpoint's recipe behind (it would not make the export)."""
    from offline.cli import main

    model = tiny_dir("llama")
    recipe = _write(tmp_path / "r.json", json.dumps({"method": "rtn", "format": "compressed-tensors"}))
    ct1, ct2 = str(tmp_path / "ct1"), str(tmp_path / "ct2")
    assert main(["convert", model, ct1, "--recipe", recipe, "--no-progress"]) == 0
    assert load_recipe(os.path.join(ct1, RECIPE_FILE))["format"] == "compressed-tensors"
    assert main(["convert", model, ct2, "--recipe", os.path.join(ct1, RECIPE_FILE), "--no-progress"]) == 0
    _same_files(ct1, ct2)
    haq = convert_model(model, tmp_path / "haq", method="rtn")
    assert main(["export", haq, str(tmp_path / "exported")]) == 0
    assert not os.path.exists(tmp_path / "exported" / RECIPE_FILE)


@pytest.mark.parametrize("doc, message", [
    ({"calibration": {"sample": 8}}, r"r\.yaml: unknown key 'calibration\.sample' \(did you mean "
                                     r"'calibration\.samples'\?\)"),
    ({"calibration": {"samples": "eight"}}, r"r\.yaml: calibration\.samples: expected an integer, got 'eight'"),
    ({"calibration": {"samples": 0}}, r"r\.yaml: calibration\.samples: 0 is below 1"),
    ({"method": "fast"}, r"r\.yaml: method: 'fast' is not one of \['rtn', 'gptq', 'smoothquant', 'haq'\]"),
    ({"smoothing": {"alpha": 1.5}}, r"r\.yaml: smoothing\.alpha: 1\.5 is above 1\.0"),
    ({"gptq": {"act_order": "no"}}, r"r\.yaml: gptq\.act_order: expected true or false, got 'no'"),
    ({"gptq": 5}, r"r\.yaml: gptq: expected a mapping of its keys, got 5"),
    ({"haq_recipe": 2}, r"r\.yaml: haq_recipe: 2 is not a recipe version"),
    ({"resume": True}, r"r\.yaml: 'resume' is no recipe key.*--resume"),
    ({"method": "gptq", "rotation": "all"}, r"r\.yaml: --rotation all needs --method haq"),
    ("method: [haq\n", r"r\.yaml: not valid YAML \(line 2, column 1: "),
    ("- method\n", r"r\.yaml: a recipe is a mapping of keys"),
])
def test_recipe_errors_name_the_file_and_the_key(doc, message, tmp_path):
    path = _write(tmp_path / "r.yaml", doc)
    with pytest.raises(RecipeError, match=message):
        build_options(path)


def test_recipe_errors_through_the_command_line_and_the_api(tiny_dir, tmp_path, capsys):
    from offline.cli import main

    bad = _write(tmp_path / "bad.yaml", {"calibration": {"seq_len": -1}})
    out = str(tmp_path / "out")
    assert main(["convert", tiny_dir("llama"), out, "--recipe", bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"haq convert: error: {bad}: calibration.seq_len: -1 is below 1"]
    assert main(["convert", tiny_dir("llama"), out, "--recipe", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml: cannot read the recipe (No such file or directory)" in capsys.readouterr().err
    assert main(["convert", tiny_dir("llama"), out, "--samples", "0", "--method", "rtn"]) == 1
    assert "haq convert: error: --samples: 0 is below 1" in capsys.readouterr().err
    with pytest.raises(RecipeError, match=r"recipe \(dict\): unknown key 'methd' \(did you mean 'method'\?\)"):
        convert_model(tiny_dir("llama"), out, recipe={"methd": "rtn"})
    with pytest.raises(RecipeError, match=r"convert_model\(\): unknown option 'sample' \(did you mean 'samples'\?\)"):
        convert_model(tiny_dir("llama"), out, sample=8)
    with pytest.raises(RecipeError, match=r"'num_calibration_samples' is llm-compressor's name; pass samples="):
        convert_model(tiny_dir("llama"), out, num_calibration_samples=8)
    with pytest.raises(RecipeError, match=r"convert_model\(\) seq_len: expected an integer, got '64'"):
        convert_model(tiny_dir("llama"), out, seq_len="64")
    with pytest.raises(RecipeError, match=r"dataset: expected a calibration source .* got dict"):
        convert_model(tiny_dir("llama"), out, dataset={"text": ["a"]})
    with pytest.raises(RecipeError, match=r"bad\.json: not valid JSON"):
        convert_model(tiny_dir("llama"), out, recipe=_write(tmp_path / "bad.json", "{method: rtn}"))
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "bad.yaml"]  # nothing converted


def test_recipe_keys_are_the_options_and_round_trip():
    """Every option but resume/overwrite/cache_dir/device has one key; a recipe of non-default values reads back as
    written (floats such as 1e-05, YAML-special strings, paths with spaces); partial recipes take the defaults."""
    fields = recipe_fields()
    names = [f.name for f in dataclasses.fields(ConvertOptions)]
    run_only = {"resume", "overwrite", "cache_dir", "device"}
    assert sorted(f.name for f in fields.values()) == sorted(set(names) - run_only)
    odd = ConvertOptions(method="smoothquant", calib=["/a b/c.txt", "x: y", "#no comment", "yes"], calib_split="",
                         calib_field="null", calib_chat_template=True, samples=3, seq_len=7, seed=-2, ignore=[],
                         routing_stats=False, alpha=0.25, moe_smoothing="per-expert", rotation="none",
                         gptq_block_size=16, gptq_dampening=1e-5, act_order=False, chunk=2, format="haq",
                         revision="v1.0")
    text = dump_recipe(odd)
    assert build_options(yaml.safe_load(text)) == odd
    assert build_options(json.loads(json.dumps(recipe_dict(odd)))) == odd
    assert text.count("\n") == 3 + len(fields) + 1 + 3  # comment lines, keys, version, section headings
    assert build_options({"calibration": {"samples": 8}}) == ConvertOptions(samples=8)
    assert build_options({"gptq": {"dampening": "1e-2"}}).gptq_dampening == 0.01  # PyYAML reads 1e-2 as a string
    assert build_options({"calibration": {"dataset": "c.txt"}}).calib == ["c.txt"]


def test_the_reference_documents_every_recipe_key():
    from test_cli import reference_tables

    rows = next(rows for heading, rows in reference_tables().items() if heading.startswith("Recipe keys"))
    documented = {r[0].strip("`"): r for r in rows}
    fields = recipe_fields()
    assert set(documented) == {"haq_recipe", *fields}
    for key, f in fields.items():
        flag = f.metadata.get("flag")
        assert (f"`{flag}`" if flag else "–") == documented[key][1], key


def test_convert_recipe_example(tiny_dir, calib_file, tmp_path, capsys):
    """examples/convert_recipe.py runs as documented: converts, prints the recipe, reproduces the files."""
    import runpy

    from conftest import REPO

    main = runpy.run_path(os.path.join(REPO, "examples", "convert_recipe.py"))["main"]
    out = str(tmp_path / "out")
    assert main([tiny_dir("llama"), out, "--calib", calib_file, "--samples", "2", "--seq-len", "32",
                 "--method", "smoothquant"]) == 0
    printed = capsys.readouterr().out
    assert "method: smoothquant  # --method" in printed and printed.endswith(": identical files\n")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_the_usage_example_is_what_a_conversion_writes():
    """docs/usage.md shows the recipe dump_recipe writes (calibrated on wiki.train.txt, all else default)."""
    import re

    from conftest import REPO

    text = open(os.path.join(REPO, "docs", "usage.md"), encoding="utf-8").read()
    shown = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    version = re.compile(r"^# vllm-haq \S+ ")  # the docs need not change with each release
    assert version.sub("", shown) == version.sub("", dump_recipe(ConvertOptions(calib=["wiki.train.txt"])))
