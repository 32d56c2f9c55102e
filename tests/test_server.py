"""`haq serve`: vLLM's OpenAI-compatible server with the plugin, on 127.0.0.1, answering completions, serving the
tiny Mixtral with its experts offloaded (2 of 8 slots per layer), the statistics on its Prometheus /metrics."""

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from prometheus_client.parser import text_string_to_metric_families

from offline.perplexity import hf_token_nll

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(haq_dir, tmp_path_factory):
    ckpt = haq_dir("mixtral")
    port = _free_port()
    work = tmp_path_factory.mktemp("server")
    log, stats = work / "server.log", work / "stats.json"
    # stats_file rewritten after every MoE layer step: the engine's own statistics, current when a request ends
    haq = {"slots_per_layer": 2, "stats_file": str(stats), "stats_interval_s": 1e-9}
    cmd = [sys.executable, "-m", "offline.cli", "serve", ckpt, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "256", "--gpu-memory-utilization", "0.3", "--enforce-eager",
           "--additional-config", json.dumps({"haq": haq})]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, ckpt, log, stats
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_answers_completion_with_the_plugin(server):
    base, ckpt, log, _ = server
    models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=10).read())
    assert models["data"][0]["id"] == ckpt
    body = {"model": ckpt, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.0}
    out = _post(base + "/v1/completions", body)
    choice = out["choices"][0]
    assert out["usage"]["completion_tokens"] == 8 and isinstance(choice["text"], str) and choice["text"]
    assert "quantization=haq" in log.read_text()  # the engine really ran the plugin's method


def test_served_prompt_logprobs_match_int8_reference(server):
    """Served (default bf16 activations) prompt log-probs stay close to the float32 int8 reference."""
    base, ckpt, _, _ = server
    ids = torch.randint(2, 500, (1, 40), generator=torch.Generator().manual_seed(7))
    out = _post(base + "/v1/completions", {
        "model": ckpt, "prompt": ids[0].tolist(), "max_tokens": 1, "temperature": 0.0,
        "echo": True, "logprobs": 0, "return_tokens_as_token_ids": True,
    })
    lp = out["choices"][0]["logprobs"]
    assert [int(t.split(":")[1]) for t in lp["tokens"][:40]] == ids[0].tolist()
    served = torch.tensor(lp["token_logprobs"][1:40], dtype=torch.float64)
    ref = -hf_token_nll(ckpt, ids)[0].double()
    # bf16 activations vs float32 reference: bf16 rounding (not int8) dominates this difference.
    assert float((served - ref).abs().mean()) < 0.05


def test_openai_client_example_against_the_server(server):
    """examples/openai_client.py, as a user runs it, gets the same greedy completion as a raw request."""
    base, ckpt, _, _ = server
    prompt = "The quick brown fox"
    raw = _post(base + "/v1/completions", {"model": ckpt, "prompt": prompt, "max_tokens": 6, "temperature": 0.0})
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "openai_client.py")
    proc = subprocess.run([sys.executable, example, "--base-url", base + "/v1", "--max-tokens", "6", prompt],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"{prompt!r} -> {raw['choices'][0]['text']!r} (6 tokens)"


def _haq_series(base: str) -> dict[tuple, float]:
    """(sample name, labels) -> value of the vllm_haq_* samples of the server's /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text)
            if fam.name.startswith("vllm_haq_") for s in fam.samples if not s.name.endswith("_created")}


TOTALS = ("steps", "hits", "misses", "fetches", "prefetches", "prefetch_hits", "cpu_experts", "cpu_expert_tokens",
          "bytes_h2d", "recovered_faults")


def test_offload_statistics_on_prometheus_metrics(server):
    """The engine's offload counters reach /metrics through the vllm.stat_logger_plugins entry point and equal
    its own statistics (its stats_file), totals and per layer."""
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="vllm.stat_logger_plugins")]
    if not any(v.startswith("vllm_haq.vllm.metrics") for v in plugins):
        pytest.fail(f"vllm-haq's stat-logger entry point is not installed (found {plugins}): reinstall the "
                    "package (make install, or pip install -e .) so that pyproject.toml's entry points are registered")
    base, ckpt, _, stats_file = server
    for prompt in ("The capital of France is", "Experts are routed by a gate", "1 2 3 4 5 6"):
        _post(base + "/v1/completions", {"model": ckpt, "prompt": prompt, "max_tokens": 12, "temperature": 0.0})
    labels = (("engine", "0"), ("model_name", ckpt))
    deadline = time.time() + 10  # the last step's counters are recorded before its response; poll only for slack
    while True:
        engine, series = json.loads(stats_file.read_text()), _haq_series(base)
        got = {k: series.get((f"vllm_haq_offload_{k}_total", labels)) for k in TOTALS}
        if got == {k: engine[k] for k in TOTALS} or time.time() > deadline:
            break
        time.sleep(0.5)
    assert got == {k: engine[k] for k in TOTALS}, (got, engine)
    assert engine["hits"] > 0 and engine["misses"] > 0 and engine["fetches"] + engine["prefetches"] > 0
    assert engine["bytes_h2d"] > 0 and engine["cpu_expert_tokens"] > 0  # 2 of 8 slots: copies and CPU experts
    assert series[("vllm_haq_offload_hit_rate", labels)] == pytest.approx(engine["hit_rate"], abs=1e-4)
    if engine["prefetches"]:
        assert series[("vllm_haq_offload_prefetch_accuracy", labels)] == pytest.approx(engine["prefetch_accuracy"],
                                                                                       abs=1e-4)
    layers = {}
    for (name, lab), v in series.items():
        if name.startswith("vllm_haq_offload_layer_"):
            lab = dict(lab)
            layers.setdefault(lab["layer"], {})[name[len("vllm_haq_offload_layer_"):-len("_total")]] = v
    assert set(layers) == {str(i) for i in engine["routing"]["layer_indices"]}  # every MoE layer, by model index
    for k in ("hits", "misses", "fetches", "cpu_expert_tokens"):
        assert sum(row[k] for row in layers.values()) == engine[k], k
