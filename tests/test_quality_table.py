"""benchmarks/quality.py's result store: runs merge cell by cell, and never pair cells of different windows."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quality.py")


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(store, run_id, windows, samples=1):
    store["runs"].append({"id": run_id, "date": "d", "machine": "m", "vllm": "v", "command": "c", "windows": windows,
                          "kl_windows": 2, "samples": samples, "notes": []})


def _row(cols, n, nll, model="tiny"):
    return {"model": model, "ppl": {c: {"wiki.test": 2.0 + nll} for c in cols}, "cost": {}, "hf": {}, "notes": [],
            "window_nll": {c: {"wiki.test": [nll + 0.01 * i for i in range(n)]} for c in cols}, "kl": {}}


def test_a_run_on_other_windows_replaces_the_row_instead_of_pairing_mismatched_cells(quality, tmp_path):
    store = {"runs": [], "rows": []}
    _run(store, 1, 3)
    quality.merge(store, _row(["bf16", "SmoothQuant", "HAQ shared"], 3, 1.0), 1)
    quality.merge(store, _row(["bf16"], 3, 0.5, model="second"), 1)
    _run(store, 2, 3)  # same windows: cell by cell, the older cells stay
    quality.merge(store, _row(["bf16", "GPTQ"], 3, 1.1), 2)
    assert store["rows"][0]["run"] == {"bf16": 2, "SmoothQuant": 1, "HAQ shared": 1, "GPTQ": 2}

    _run(store, 3, None)  # all windows: the 3-window cells cannot be paired with these
    quality.merge(store, _row(["bf16"], 5, 1.2), 3)
    quality.merge(store, _row(["bf16", "HAQ shared"], 5, 1.2), 3)  # the same run's next partial save
    row, _ = store["rows"]  # replaced where it was: the table keeps its row order
    assert row["run"] == {"bf16": 3, "HAQ shared": 3}
    assert all(len(v["wiki.test"]) == 5 for v in row["window_nll"].values())
    assert len(store["runs"][-1]["notes"]) == 1 and "run(s) 1, 2" in store["runs"][-1]["notes"][0]
    out = str(tmp_path / "quality.md")
    quality.save_store(store, out)  # renders: no zip of 3 against 5 windows
    table = open(out).read()
    assert table.index("| tiny | wiki.test |") < table.index("| second | wiki.test |")

    _run(store, 4, None, samples=2)  # same windows, another calibration budget: one row, one calibration
    quality.merge(store, _row(["bf16", "GPTQ"], 5, 1.3), 4)
    row, _ = store["rows"]
    assert row["run"] == {"bf16": 4, "GPTQ": 4}
    assert "calibrated on 1" in store["runs"][-1]["notes"][0] and "calibrated on 2" in store["runs"][-1]["notes"][0]
