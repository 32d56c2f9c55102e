"""Hugging Face ids (vllm_haq.format.hub): ``haq convert ORG/NAME OUT`` and the plugin, on a hub cache written
in the test (tests/hub_cache.py) and read with ``HF_HUB_OFFLINE=1``; the model card files of the output.

The conversions go through the real command line in a subprocess, with the cache in the environment
(huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` when imported). One vLLM engine start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, shared_path
from hub_cache import add_snapshot
from tiny_models import DENSE_FAMILIES, FAMILIES, NEW_MOE_FAMILIES

LICENSE = "Tiny licence: do what you like.\n"
README = "---\nlicense: other\n---\n# acme/tiny-opt\n\nThe source's own model card.\n"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with acme/tiny-opt: ``main`` (with LICENSE and README.md) and branch ``v1`` (another README)."""
    root = tmp_path_factory.mktemp("hub")
    cache = str(root / "hub")
    model = shared_path("models", "tiny-opt")
    main = add_snapshot(cache, "acme/tiny-opt", model, extra={"LICENSE": LICENSE, "README.md": README})
    v1 = add_snapshot(cache, "acme/tiny-opt", model, branch="v1", extra={"LICENSE": LICENSE, "README.md": "# v1\n"})
    return {"root": str(root), "cache": cache, "main": main, "v1": v1, "model": model}


def _haq(hub, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub["cache"], "HF_HOME": hub["root"] + "/home",
           "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "offline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _producer(out: str) -> dict:
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)["quantization_config"]["producer"]


def test_the_written_cache_is_a_hub_cache_to_huggingface_hub(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    refs = {r.commit_hash: set(r.refs) for r in repo.revisions}
    assert repo.repo_id == "acme/tiny-opt" and refs == {hub["main"]: {"main"}, hub["v1"]: {"v1"}}


def test_convert_a_hub_id_offline_carries_licence_readme_and_model_card(hub, tmp_path):
    out = str(tmp_path / "out")
    r = _haq(hub, "convert", "acme/tiny-opt", out, "--method", "rtn", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert {"LICENSE", "README.md"} <= set(os.listdir(out))
    assert open(os.path.join(out, "LICENSE")).read() == LICENSE
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith(README.rstrip("\n") + "\n\n## Quantization (vllm-haq)\n"), card[:300]
    assert f"`acme/tiny-opt` (revision `main`, commit `{hub['main']}`)" in card
    assert "W8A8 int8" in card and "Method: `rtn`" in card and 'quantization="haq"' in card
    assert _producer(out)["base_model"] == {"repo_id": "acme/tiny-opt", "revision": "main", "commit": hub["main"]}
    # the same weights as converting the directory
    from offline.convert import ConvertOptions, convert

    local = str(tmp_path / "local")
    convert(hub["model"], local, ConvertOptions(method="rtn"))
    for name in os.listdir(local):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(local, name), "rb").read(), name


@pytest.mark.parametrize("family", FAMILIES + DENSE_FAMILIES + NEW_MOE_FAMILIES)
def test_every_family_converts_from_a_hub_id_offline(family, tiny_dir, calib_file, tmp_path):
    """Issue 23: each supported family's tiny model, put in a hub cache under an id, converts offline from the id
    (rtn; MoE families collect their routing statistics from the calibration text)."""
    cache = str(tmp_path / "hub")
    repo_id = f"acme/tiny-{family.replace('_', '-')}"
    commit = add_snapshot(cache, repo_id, tiny_dir(family))
    out = str(tmp_path / "out")
    hub = {"cache": cache, "root": str(tmp_path)}
    r = _haq(hub, "convert", repo_id, out, "--method", "rtn", "--calib", calib_file, "--samples", "2",
             "--seq-len", "32", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _producer(out)["base_model"] == {"repo_id": repo_id, "revision": "main", "commit": commit}
    from vllm_haq.format import validate_checkpoint

    validate_checkpoint(out)


def test_revision_selects_the_snapshot(hub, tmp_path):
    out = str(tmp_path / "v1")
    r = _haq(hub, "convert", "acme/tiny-opt", out, "--method", "rtn", "--revision", "v1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(out, "README.md")).read().startswith("# v1\n\n## Quantization (vllm-haq)\n")
    assert _producer(out)["base_model"] == {"repo_id": "acme/tiny-opt", "revision": "v1", "commit": hub["v1"]}


def test_unknown_id_or_revision_offline_is_a_clear_error(hub, tmp_path):
    r = _haq(hub, "convert", "acme/missing", str(tmp_path / "x"), "--method", "rtn")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "acme/missing: not a local directory, and not in the Hugging Face cache" in r.stderr
    assert hub["cache"] in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_library_resolution_commit_revision_cache_dir_and_errors(hub, tmp_path, monkeypatch):
    """In this process: a commit id as revision, ``cache_dir`` instead of the environment, the errors."""
    import huggingface_hub.constants

    from offline.convert import ConvertError, ConvertOptions
    from offline.plan import plan_conversion
    from vllm_haq.format import ModelNotFoundError, config_dir, resolve_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    opts = ConvertOptions(method="rtn", revision=hub["v1"], cache_dir=hub["cache"])
    plan = plan_conversion("acme/tiny-opt", str(tmp_path / "o"), opts)
    assert plan.model_dir.endswith(os.path.join("snapshots", hub["v1"]))
    assert plan.producer()["base_model"]["commit"] == hub["v1"]
    # haq serve / make_llm read an id's config.json from the same cache
    assert config_dir("acme/tiny-opt", cache_dir=hub["cache"]).endswith(os.path.join("snapshots", hub["main"]))
    with pytest.raises(ModelNotFoundError, match=r"acme/tiny-opt \(revision v9\): not a local directory"):
        resolve_model("acme/tiny-opt", "v9", hub["cache"])
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model("./no/such/dir")
    with pytest.raises(ConvertError, match="is a local directory"):
        plan_conversion(hub["model"], str(tmp_path / "o"), ConvertOptions(method="rtn", revision="v1"))


def test_local_conversion_gets_a_model_card_and_no_source(tmp_path):
    from offline.convert import ConvertOptions, convert

    model = shared_path("models", "tiny-opt")
    out = str(tmp_path / "out")
    convert(model, out, ConvertOptions(method="rtn"))
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\ntags:\n- vllm-haq\n") and "the model in `tiny-opt`" in card
    assert "base_model" not in _producer(out)


PROBE = r"""
import json, sys
import vllm.engine.arg_utils as arg_utils

# vLLM replaces a cached id by its snapshot path when HF_HUB_OFFLINE is set (arg_utils.py:907-922): undone here,
# so that the engine keeps the id as it does online, while huggingface_hub still reads the cache only
arg_utils.get_model_path = lambda model, revision=None: model
from vllm_haq.vllm.scoring import make_llm

def probe(worker):
    from vllm_haq.vllm.moe_method import HAQMoEMethod
    for m in worker.get_model().modules():
        method = getattr(m, "quant_method", None)
        if isinstance(method, HAQMoEMethod) and method.engine is not None:
            return {"has_prior": bool(method.engine.stats_model.has_prior),
                    "checkpoint_dir": method.quant_config.checkpoint_dir}

llm = make_llm(sys.argv[1], max_model_len=128, dtype="float32", enforce_eager=True,
               additional_config={"haq": {"slots_per_layer": 1, "policy": "lru"}})
from vllm import SamplingParams
out = llm.generate(["The history of"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
print("RESULT " + json.dumps({"probe": llm.collective_rpc(probe), "model": llm.llm_engine.model_config.model,
                              "tokens": list(out[0].outputs[0].token_ids)}))
"""


def test_plugin_finds_routing_statistics_of_a_hub_id(tmp_path):
    """A converted MoE checkpoint in the hub cache, served by id: the plugin validates the snapshot and seeds
    the offload planner with its haq_routing.safetensors (before, it warned and started uniform)."""
    from offline.convert import ConvertOptions, convert

    ckpt = str(tmp_path / "tiny-mixtral-haq")
    convert(shared_path("models", "tiny-mixtral"), ckpt,
            ConvertOptions(method="rtn", calib=[shared_path("data", "corpora", "wiki.train.txt")], samples=4,
                           seq_len=64))
    cache = str(tmp_path / "hub")
    commit = add_snapshot(cache, "acme/tiny-mixtral-haq", ckpt)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": REPO, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, "acme/tiny-mixtral-haq"], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["model"] == "acme/tiny-mixtral-haq" and len(result["tokens"]) == 4
    (probe,) = result["probe"]
    assert probe["has_prior"] is True, r.stderr[-3000:]
    assert probe["checkpoint_dir"].endswith(os.path.join("models--acme--tiny-mixtral-haq", "snapshots", commit))
    assert "has no routing statistics" not in r.stderr
