"""haq convert's progress inside a layer: the unit events (order, totals, coverage, no effect on the output), the
ETAs and what the command line shows on a terminal and off one."""

import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, shared_path
from offline.convert import ConvertEvents, ConvertOptions, convert
from offline.convert_progress import ConvertProgress, format_eta
from offline.models import spec_for
from offline.plan import layer_targets
from vllm_haq.format import SAFETENSORS_INDEX


class Recorder(ConvertEvents):
    def __init__(self):
        self.units = []

    def unit_done(self, layer, done, total, what):
        self.units.append((layer, done, total, what))


def _expand(label: str) -> list[str]:
    """offline.haq.progress.label's "head.a+b+c" (or "x.a+y.b") back to the module names."""
    parts = label.split("+")
    head = parts[0].rpartition(".")[0]
    return [parts[0]] + [p if "." in p else f"{head}.{p}" for p in parts[1:]]


def _check_units(units, model_dir, opts):
    """Every layer: a start (done 0), then 1..total in order; each target rounded once; one statistics and one
    forward chunk per opts.chunk samples. Returns the units of each layer as (step, name)."""
    import json

    spec = spec_for(json.load(open(os.path.join(model_dir, "config.json"))))
    assert [u[0] for u in units] == sorted(u[0] for u in units)  # layer by layer
    per_layer = {}
    for i in range(spec.num_layers):
        mine = [u for u in units if u[0] == i]
        total = mine[0][2]
        assert [u[1] for u in mine] == list(range(total + 1)) and {u[2] for u in mine} == {total}
        assert mine[0][3] == "loading"
        steps = [tuple(u[3].split(" ", 1)) for u in mine[1:]]
        rounded = [m for step, name in steps if step in ("GPTQ", "rounding") for m in _expand(name)]
        assert sorted(rounded) == sorted(layer_targets(spec, i, opts.ignore))
        chunks = math.ceil(opts.samples / opts.chunk)
        assert [s for s, _ in steps].count("statistics") == chunks and [s for s, _ in steps].count("forward") == chunks
        per_layer[i] = steps
    return spec, per_layer


def test_unit_events_cover_every_linear_and_expert_of_tiny_mixtral(calib_file, tmp_path):
    model = shared_path("models", "tiny-mixtral")
    opts = ConvertOptions(calib=[calib_file], samples=4, seq_len=64)
    rec = Recorder()
    convert(model, str(tmp_path / "out"), opts, events=rec)
    spec, per_layer = _check_units(rec.units, model, opts)
    for steps in per_layer.values():
        order = [s for s, _ in steps]  # statistics, then the searches, then GPTQ, then the forward run
        rank = {"statistics": 0, "search": 1, "GPTQ": 2, "rounding": 2, "forward": 3}  # rounding: too few tokens
        assert order == sorted(order, key=rank.__getitem__)
        searched = [name for step, name in steps if step == "search"]
        for e in range(spec.num_experts):  # each expert's down projection is searched on its own
            assert f"block_sparse_moe.experts.{e}.w2" in searched
        gptq = [name for step, name in steps if step == "GPTQ"]
        assert "self_attn.q_proj+k_proj+v_proj" in gptq  # experts with too few tokens are rounded instead
        assert any(re.fullmatch(r"block_sparse_moe\.experts\.\d\.w1\+w3", n) for n in gptq)


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_listening_changes_no_output_byte_and_counts_per_expert_searches(tiny_dir, calib_file, tmp_path):
    opts = ConvertOptions(calib=[calib_file], samples=4, seq_len=64, moe_smoothing="per-expert")
    rec = Recorder()
    convert(tiny_dir("mixtral"), str(tmp_path / "listened"), opts, events=rec)
    convert(tiny_dir("mixtral"), str(tmp_path / "plain"), opts)
    a, b = _files(str(tmp_path / "listened")), _files(str(tmp_path / "plain"))
    assert SAFETENSORS_INDEX in a and a.keys() == b.keys()
    assert [f for f in a if a[f] != b[f]] == []
    spec, per_layer = _check_units(rec.units, tiny_dir("mixtral"), opts)
    for steps in per_layer.values():
        searched = [name for step, name in steps if step == "search"]
        assert all(f"block_sparse_moe.experts.{e}.w1+w3" in searched for e in range(spec.num_experts))


def test_format_eta():
    assert [format_eta(s) for s in (None, float("nan"), float("inf"), -3, 0, 44.6, 59.4)] == \
        ["?", "?", "?", "0 s", "0 s", "45 s", "59 s"]
    assert [format_eta(s) for s in (60, 61, 1260, 3599, 3600, 3601, 7500)] == \
        ["1 min", "2 min", "21 min", "1 h 00 min", "1 h 00 min", "1 h 01 min", "2 h 05 min"]


def test_etas_come_from_measured_time_per_unit_and_layer():
    now = [100.0]
    p = ConvertProgress(enabled=False, clock=lambda: now[0])
    p.layers(2, 6)  # resumed: 4 layers to do in this run
    p.unit_done(2, 0, 10, "loading")
    assert p.layer_eta(0, 10) is None and p.conversion_eta() is None
    now[0] = 130.0
    p.unit_done(2, 3, 10, "search self_attn.q_proj+k_proj+v_proj")
    assert p.layer_eta(3, 10) == pytest.approx(70.0)  # 10 s a unit, 7 left
    assert p.conversion_eta() == pytest.approx(30 / 0.3 * 3.7)  # 100 s a layer, 3.7 layers left
    now[0] = 200.0
    p.layer_done(type("R", (), {"index": 2, "quantized": 7, "max_rel_error": 0.01, "seconds": 100.0})(), 6)
    assert p.conversion_eta() == pytest.approx(300.0)


def test_plain_lines_with_an_eta_when_stderr_is_no_terminal(tiny_dir, tmp_path, capsys):
    from offline.cli import main

    assert main(["convert", tiny_dir("llama"), str(tmp_path / "o"), "--method", "rtn"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[haq\] layer 1/2: 7 linears quantized, .*s; ETA \d+ s\n", err)
    assert re.search(r"\[haq\] layer 2/2: 7 linears quantized, [^\n;]*s\n", err)  # none after the last layer
    assert "ETA layer" not in err and "[haq] layers" not in err  # no bars


def test_inner_bar_with_etas_under_a_pseudo_terminal(tiny_dir, calib_file, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "offline.cli", "convert", tiny_dir("mixtral"), str(tmp_path / "o"),
           "--calib", calib_file, "--samples", "2", "--seq-len", "32"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0
    err = b"".join(chunks).decode(errors="replace")
    eta = r"ETA layer \d+ (s|min), all \d+ (s|min)"
    assert re.search(r"\[haq\] layer 1/2: +\d+%\|.*\| \d+/\d+ \[[\d:]+, " + eta + "; GPTQ ", err)
    assert re.search(r"\[haq\] layer 2/2: +\d+%\|.*" + eta + "; search block_sparse_moe", err)
    assert re.search(r"\[haq\] layer 1/2: 28 linears quantized, .*; ETA \d+ (s|min)", err)  # 4 + 8 x 3
