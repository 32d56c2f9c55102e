"""SIGKILL ``haq convert`` around its atomic commits, then ``--resume``: the result is bit-identical to an
uninterrupted run, and an interrupted run never leaves a directory that looks complete."""

import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _convert(src, out, calib, *extra, kill_at=0, when="before"):
    env = dict(os.environ, KILL_AT=str(kill_at), KILL_WHEN=when)
    cmd = [sys.executable, os.path.join(HERE, "crash_convert.py"), "convert", src, out, "--method", "rtn",
           "--calib", calib, "--samples", "4", "--seq-len", "64", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _files(d):
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = f.read()
    return out


def test_sigkill_at_random_commits_then_resume_is_bit_identical(tiny_dir, calib_file, tmp_path):
    src = tiny_dir("mixtral")
    ref = str(tmp_path / "reference")
    done = _convert(src, ref, calib_file)
    assert done.returncode == 0, done.stderr[-2000:]
    commits = int(done.stdout.rsplit("COMMITS", 1)[1])
    want = _files(ref)
    assert commits >= 6 and not any(name.endswith(".tmp") for name in want)

    points = [(k, w) for k in range(1, commits + 1) for w in ("before", "after")]
    final = (commits, "before")  # the finished work directory, just before its rename into place
    for k, when in random.Random(1234).sample([p for p in points if p != final], 3) + [final]:
        out = str(tmp_path / f"killed-{k}-{when}")
        killed = _convert(src, out, calib_file, kill_at=k, when=when)
        assert killed.returncode == -9, (k, when, killed.stderr[-2000:])
        if (k, when) != (commits, "after"):  # after the last commit (the rename) the output is complete
            assert not os.path.exists(out), f"killed {when} commit {k}: {out} looks complete"
            resumed = _convert(src, out, calib_file, "--resume")
            assert resumed.returncode == 0, (k, when, resumed.stderr[-2000:])
        got = _files(out)
        assert got.keys() == want.keys(), (k, when, sorted(got.keys() ^ want.keys()))
        assert all(got[n] == want[n] for n in want), (k, when, [n for n in want if got[n] != want[n]])
        assert not os.path.exists(out + ".partial")
