"""The layering of docs/architecture.md: imports point downward only; only vllm_haq/vllm imports vllm."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# package -> top-level project packages (and vllm) it must not import
FORBIDDEN = {
    "vllm_haq/quant": {"vllm", "vllm_haq.format", "vllm_haq.kernels", "vllm_haq.offload", "vllm_haq.vllm", "offline"},
    "vllm_haq/errors.py": {"vllm", "vllm_haq.quant", "vllm_haq.format", "vllm_haq.kernels", "vllm_haq.offload",
                           "vllm_haq.vllm", "offline"},
    # the C++ extensions' builder, below both the converter's numerics and the kernels: stdlib and torch only
    "vllm_haq/native.py": {"vllm", "vllm_haq.errors", "vllm_haq.quant", "vllm_haq.format", "vllm_haq.kernels",
                           "vllm_haq.offload", "vllm_haq.vllm", "offline"},
    "vllm_haq/format": {"vllm", "vllm_haq.kernels", "vllm_haq.offload", "vllm_haq.vllm", "offline"},
    "vllm_haq/kernels": {"vllm_haq.format", "vllm_haq.offload", "vllm_haq.vllm", "offline"},
    "vllm_haq/offload": {"vllm", "vllm_haq.vllm", "offline"},
    "vllm_haq/vllm": {"offline"},  # the plugin runs without the converter package
    "vllm_haq": {"offline"},  # the plugin and its engine run without the converter package
    "offline": {"vllm", "vllm_haq.vllm"},
    # --dry-run sizes the ConversionPlan that offline.convert carries out; it never imports the converter (they
    # used to import each other), and the plan imports neither
    "offline/estimate.py": {"vllm", "vllm_haq.vllm", "offline.convert"},
    "offline/estimate_ram.py": {"vllm", "vllm_haq.vllm", "offline.convert", "offline.estimate"},
    "offline/plan.py": {"vllm", "vllm_haq.vllm", "offline.convert", "offline.estimate", "offline.cli"},
}


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _files(rel):
    full = os.path.join(REPO, rel)
    if full.endswith(".py"):
        return [full]
    return [os.path.join(dp, f) for dp, _, fs in os.walk(full) for f in fs if f.endswith(".py")]


@pytest.mark.parametrize("rel", sorted(FORBIDDEN))
def test_no_upward_imports(rel):
    bad = []
    for path in _files(rel):
        for mod in _imports(path):
            for forbidden in FORBIDDEN[rel]:
                if mod == forbidden or mod.startswith(forbidden + "."):
                    # kernels may use vLLM's compiled ops, optionally (docs/architecture.md)
                    if not (rel == "vllm_haq/kernels" and mod == "vllm._custom_ops"):
                        bad.append(f"{os.path.relpath(path, REPO)} imports {mod}")
    # The one sanctioned crossing: `haq eval --backend vllm` calls the adapter lazily.
    bad = [b for b in bad if b != "offline/cli.py imports vllm_haq.vllm.scoring"]
    assert not bad, bad


def test_converting_and_hf_eval_never_load_vllm():
    code = ("import sys, offline.cli, offline.convert, offline.estimate, offline.perplexity, offline.generate, "
            "vllm_haq.format, vllm_haq.quant; "
            "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('vllm')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
