"""The ``haq`` command line and docs/configuration.md (the configuration reference): its tables are parsed and
checked against the code in both directions (flags, defaults, offloading keys, environment variables);
``haq convert --dry-run`` estimates, progress bars, the final summary and ``--resume`` through the CLI.
No vLLM engine is started."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "docs", "configuration.md")


# ---------------------------------------------------------------- the reference tables (docs/configuration.md)

def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def reference_tables() -> dict[str, list[list[str]]]:
    """heading -> rows (cells) of the table under it, in docs/configuration.md (all of it is the reference)."""
    text = open(REFERENCE, encoding="utf-8").read()
    assert text.startswith("# Configuration reference\n"), REFERENCE
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            tables[heading] = []
        elif line.startswith("|") and heading is not None:
            cells = _cells(line)
            if set("".join(cells)) <= set("-: ") or cells[0] in ("option", "key", "variable"):
                continue  # separator and header rows
            tables[heading].append(cells)
    return tables


def _code(cell: str) -> str:
    """The first word inside the cell's first backticks: `--calib SOURCE...` -> --calib."""
    m = re.search(r"`([^`]+)`", cell)
    assert m, f"reference cell without `code`: {cell!r}"
    return m.group(1).split()[0]


def command_tables() -> dict[str | None, list[list[str]]]:
    """subcommand (None: the global options) -> its rows."""
    out = {}
    for heading, rows in reference_tables().items():
        m = re.fullmatch(r"`haq(?: ([a-z-]+))?`.*", heading)
        if m:
            out[m.group(1)] = rows
    return out


def _table(word: str) -> list[list[str]]:
    found = [rows for heading, rows in reference_tables().items() if word in heading]
    assert len(found) == 1, f"expected one reference table whose heading contains {word!r}"
    return found[0]


def _parsers() -> dict[str | None, argparse.ArgumentParser]:
    from offline.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {None: top, **sub.choices}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [a.metavar or a.dest.upper() for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _literal(cell: str):
    """A documented default that is a plain value (`rtn`, 0.5, 30, off), else None."""
    cell = cell.strip()
    if cell == "off":
        return False
    if re.fullmatch(r"`[^`]+`", cell):
        return cell.strip("`")
    try:
        return float(cell)
    except ValueError:
        return None


def _same_default(documented, actual) -> bool:
    if isinstance(documented, bool) or isinstance(actual, bool):
        return documented is actual
    if isinstance(documented, float):
        return isinstance(actual, (int, float)) and documented == float(actual)
    return documented == str(actual)


def test_reference_documents_every_subcommand_and_flag_and_they_parse():
    parsers, tables = _parsers(), command_tables()
    assert set(tables) == set(parsers), "docs/configuration.md tables vs haq subcommands"
    for cmd, parser in parsers.items():
        rows = tables[cmd]
        flags = _flags(parser)
        documented = {_code(r[0]): r for r in rows if _code(r[0]).startswith("-")}
        assert set(documented) == set(flags), f"haq {cmd}: documented {sorted(documented)} vs parser {sorted(flags)}"
        assert [_code(r[0]) for r in rows if not _code(r[0]).startswith("-")] == _positionals(parser), f"haq {cmd}"
        for flag, row in documented.items():
            action = flags[flag]
            assert len(row) == 3 and row[2], f"haq {cmd} {flag}: needs a default and a meaning"
            want = _literal(row[1])
            if action.default is not None and want is not None and action.default is not argparse.SUPPRESS:
                assert _same_default(want, action.default), f"haq {cmd} {flag}: docs {row[1]} vs {action.default!r}"
            elif action.default is None and action.required:
                assert row[1] == "required", f"haq {cmd} {flag} is required"
        # every documented flag is accepted by the parser of its subcommand
        if cmd in ("convert", "eval", "export", "import", "stats"):
            pos = {"convert": ["M", "O"], "eval": ["M"], "export": ["H", "O"], "import": ["C", "O"],
                   "stats": ["C"]}[cmd]
            required = {"eval": ["--dataset", "d.txt"], "stats": ["--out", "o"]}.get(cmd, [])
            for flag, action in flags.items():
                if flag in [r for r in required if r.startswith("--")]:
                    continue
                if action.nargs == 0:
                    value = []
                elif action.choices:
                    value = [[c for c in action.choices if c != action.default][-1]]
                elif action.type in (int, float):
                    value = ["7"]
                else:
                    value = ["x"]
                args = parsers[None].parse_args([cmd, *pos, *required, flag, *value])
                assert getattr(args, action.dest) not in (None, action.default) or action.nargs == "*", (cmd, flag)


def test_help_states_every_default():
    for cmd, parser in _parsers().items():
        if cmd in (None, "lm-eval"):
            continue
        formatter = parser._get_formatter()
        for flag, action in _flags(parser).items():
            text = formatter._get_help_string(action) if action.help else ""
            assert "default" in text, f"haq {cmd} {flag}: --help does not state the default: {text!r}"


# ---------------------------------------------------------------- additional_config keys and environment variables

VALID = {"slots_per_layer": 2, "expert_fraction": 0.25, "expert_gib": 1.5, "policy": "lru", "cpu_threads": 2,
         "prefetch": "always", "stats_file": "/tmp/haq-stats.json", "stats_interval_s": 5}


def test_reference_documents_every_additional_config_key_and_its_environment_variable():
    from vllm_haq.offload.options import ENV_VARS, OffloadConfig, OffloadConfigError, parse_offload_config

    rows = _table("additional_config")
    documented = {_code(r[0]): r for r in rows}
    assert set(documented) == set(ENV_VARS), f"docs {sorted(documented)} vs ENV_VARS {sorted(ENV_VARS)}"
    defaults = OffloadConfig()
    for key, (_, env, default, meaning) in documented.items():
        assert _code(env) == ENV_VARS[key] and meaning, key
        want, actual = _literal(default), getattr(defaults, key)
        if actual is not None:
            assert want is not None and _same_default(want, actual), f"{key}: docs {default} vs {actual!r}"
        cfg = parse_offload_config({"haq": {key: VALID[key]}}, environ={})
        from_env = parse_offload_config(None, environ={ENV_VARS[key]: str(VALID[key])})
        assert getattr(cfg, key) == getattr(from_env, key) != actual, key
    with pytest.raises(OffloadConfigError, match="bogus_key"):
        parse_offload_config({"haq": {"bogus_key": 1}}, environ={})


def _env_literals(paths) -> set[str]:
    found = set()
    for path in paths:
        text = open(path, encoding="utf-8").read()
        metavars = set(re.findall(r"metavar=[\"']([A-Z_]+)[\"']", text))
        found |= set(re.findall(r"[\"']((?:HAQ|VLLM)_[A-Z0-9_]+)[\"']", text)) - metavars
    return found


def test_reference_documents_every_environment_variable_the_package_reads():
    from vllm_haq.offload.options import ENV_VARS

    package = [p for d in ("vllm_haq", "offline")
               for p in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)]
    read = _env_literals(package)
    env_rows = _table("Environment variables")
    documented = {_code(r[0]) for r in env_rows} | set(ENV_VARS.values())
    assert read <= documented, f"undocumented: {sorted(read - documented)}"
    elsewhere = _env_literals([os.path.join(REPO, "tests", "conftest.py"),
                               *glob.glob(os.path.join(REPO, "benchmarks", "*.py"))])
    makefile = open(os.path.join(REPO, "Makefile")).read()
    for var in documented:
        assert var in read or var in elsewhere or var in makefile, f"{var} is documented but nothing reads it"
    assert all(len(r) == 4 and r[3] for r in env_rows)


# ---------------------------------------------------------------- --dry-run, summary, progress, --resume

def _tree(path: str) -> dict[str, tuple[int, int]]:
    return {os.path.relpath(os.path.join(root, f), path): (os.path.getsize(os.path.join(root, f)),
                                                           os.stat(os.path.join(root, f)).st_mtime_ns)
            for root, _, files in os.walk(path) for f in files}


def _files_bytes(path: str) -> int:
    return sum(size for size, _ in _tree(path).values())


@pytest.mark.parametrize("family, extra", [("llama", []), ("mixtral", ["--samples", "2", "--seq-len", "32"])])
def test_dry_run_estimates_without_writing_and_its_disk_estimate_holds(family, extra, tiny_dir, calib_file, tmp_path,
                                                                        capsys):
    from offline.cli import main

    model = tiny_dir(family)
    extra = extra + ["--method", "rtn"] + (["--calib", calib_file] if family == "mixtral" else [])
    before = _tree(model)
    out = str(tmp_path / "out")
    assert main(["convert", model, out, "--dry-run", "--json", *extra]) == 0
    est = json.loads(capsys.readouterr().out)
    assert not os.listdir(tmp_path) and _tree(model) == before  # nothing written, the model untouched
    assert est["estimate"] is True and est["layers"] == 2 and est["method"] == "rtn"
    assert est["ram"]["peak_bytes"] > est["largest_layer_bytes"] > 0 and est["time"]["seconds"] > 0
    assert est["disk"]["int8_weights_bytes"] == est["quantized_parameters"] > 0
    assert (est["disk"]["routing_stats_bytes"] > 0) == (family == "mixtral")
    assert main(["convert", model, out, "--dry-run", *extra]) == 0  # the human-readable form
    text = capsys.readouterr().out
    assert "estimate" in text and "peak RAM" in text and "disk" in text and "time" in text and not os.listdir(tmp_path)

    assert main(["convert", model, out, "--json", "--no-progress", *extra]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    real = _files_bytes(out)
    assert abs(est["disk"]["output_bytes"] - real) <= 0.10 * real, (est["disk"], real)
    assert summary["output_bytes"] == real and summary["source_weights_bytes"] == est["source_weights_bytes"]
    assert summary["compression_ratio"] > 1.2 and len(summary["layers"]) == 2
    assert "[haq] summary: rtn, 2 layers converted" in captured.err
    assert re.search(r"max relative weight error per layer: 0: 0\.\d{4}, 1: 0\.\d{4} \(worst: layer \d", captured.err)


def test_dry_run_refuses_what_the_conversion_refuses(tiny_dir, calib_file, tmp_path, capsys):
    from offline.cli import main

    assert main(["convert", tiny_dir("mixtral"), str(tmp_path / "o"), "--method", "rtn", "--dry-run"]) == 1
    assert "routing statistics need calibration text" in capsys.readouterr().err
    assert main(["convert", tiny_dir("llama"), str(tmp_path / "o"), "--dry-run", "--method", "gptq", "--calib",
                 str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: no such file" in capsys.readouterr().err
    # exists, no --overwrite
    assert main(["convert", tiny_dir("llama"), str(tmp_path), "--method", "rtn", "--dry-run"]) == 1
    assert "already exists" in capsys.readouterr().err
    # compressed-tensors: the same tensors; converting needs OUT_DIR.haq beside OUT_DIR for a while
    assert main(["convert", tiny_dir("llama"), str(tmp_path / "ct"), "--method", "rtn", "--dry-run", "--json",
                 "--format", "compressed-tensors"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["format"] == "compressed-tensors" and est["disk"]["peak_bytes"] >= 2 * est["disk"]["output_bytes"]
    assert sorted(os.listdir(tmp_path)) == []


def _convert_with_tty(monkeypatch, capsys, argv):
    import offline.cli as cli

    monkeypatch.setattr(cli, "_stderr_isatty", lambda: True)
    assert cli.main(argv) == 0
    return capsys.readouterr().err


def test_progress_bars_on_a_terminal_and_none_with_no_progress(tiny_dir, calib_file, tmp_path, capsys, monkeypatch):
    args = [tiny_dir("llama"), "--method", "smoothquant", "--calib", calib_file, "--samples", "2", "--seq-len", "32"]
    err = _convert_with_tty(monkeypatch, capsys, ["convert", args[0], str(tmp_path / "a"), *args[1:]])
    assert "[haq] calibration" in err and "[haq] layers" in err and "2/2" in err and "\r" in err  # tqdm bars
    quiet = _convert_with_tty(monkeypatch, capsys,
                              ["convert", args[0], str(tmp_path / "b"), *args[1:], "--no-progress"])
    for text in (err, quiet):  # the per-layer lines and the summary either way
        assert "[haq] layer 1/2: 7 linears quantized, max relative weight error" in text
        assert "[haq] layer 2/2:" in text and "[haq] summary: smoothquant, 2 layers converted" in text
    assert "\r" not in quiet and "[haq] layers" not in quiet
    assert "[haq] calibration" not in quiet and "it/s" not in quiet

    ckpt = str(tmp_path / "a")
    ev = ["eval", ckpt, "--dataset", calib_file, "--backend", "hf", "--seq-len", "32", "--max-windows", "3"]
    err = _convert_with_tty(monkeypatch, capsys, ev)
    assert "[haq] eval hf (3 passes" in err and "9/9" in err
    assert "\r" not in _convert_with_tty(monkeypatch, capsys, ev + ["--no-progress"])


def test_resume_through_the_cli_reports_the_layers_of_this_run(tiny_dir, tmp_path, capsys, monkeypatch):
    import offline.convert as convert_module
    from offline.cli import main

    out = str(tmp_path / "r")
    real_save, calls = convert_module._save_atomic, {"n": 0}

    def crash_on_second_layer(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # globals shard and layer 0 written
            raise OSError(28, "No space left on device", path + ".tmp")
        real_save(tensors, path)

    monkeypatch.setattr(convert_module, "_save_atomic", crash_on_second_layer)
    assert main(["convert", tiny_dir("llama"), out, "--method", "rtn", "--no-progress"]) == 1
    assert "rerun with --resume" in capsys.readouterr().err and os.path.isdir(out + ".partial")
    monkeypatch.setattr(convert_module, "_save_atomic", real_save)
    assert main(["convert", tiny_dir("llama"), out, "--method", "rtn", "--no-progress", "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["index"] for r in json.loads(captured.out)["layers"]] == [1]
    assert "[haq] layer 2/2:" in captured.err and "[haq] layer 1/2" not in captured.err
    assert "1 layer converted in this run" in captured.err
    assert os.path.isdir(out) and not os.path.exists(out + ".partial")
