"""Record real expert-routing traces from a trained MoE (default ../shared/models/tiny-mixtral-32l).

    .venv/bin/python benchmarks/record_traces.py [--model DIR] [--out benchmarks/traces] [--windows 8]

Runs the model's pure-PyTorch forward (offline/models/, bf16 weights in float32)
over non-overlapping 512-token windows of wiki.test, sotu.test and wiki.train and
saves, per corpus, ``{corpus}.pt``: ``topk`` int16 [windows, tokens, layers, k]
(the experts each token is routed to at every MoE layer, in token order) plus the
model's layout. The train trace is the "calibration" prior of the benchmark's
planner; the test traces drive it. The output folder is git-ignored (regenerate
with this script); ``benchmarks/offload.py`` calls it when traces are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.environ.get("HAQ_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
CORPORA = {"wiki": "wiki.test.txt", "sotu": "sotu.test.txt", "wiki-train": "wiki.train.txt"}
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "traces")


def record(model_dir: str, corpus_file: str, windows: int, seq_len: int = 512) -> dict:
    from offline.perplexity import eval_token_windows
    from offline.models import LayerTensors, global_tensor_names, spec_for
    from offline.source import SafetensorsCheckpoint

    with open(os.path.join(model_dir, "config.json")) as f:
        spec = spec_for(json.load(f))
    src = SafetensorsCheckpoint(model_dir)
    g = {n: src.get(n).float() for n in global_tensor_names(spec, src.names())}
    ids = eval_token_windows(model_dir, corpus_file, seq_len, windows)
    moe_layers = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    routes: dict[int, torch.Tensor] = {}

    def sink(i: int, topk: torch.Tensor) -> None:
        routes[i] = topk.reshape(ids.shape[0], ids.shape[1], -1).to(torch.int16)

    with torch.no_grad():
        h = spec.embed(g, ids)
        for i in range(spec.num_layers):
            lt = LayerTensors({k: v.float() for k, v in src.load_prefix(spec.layer_prefix(i)).items()})
            h = spec.layer_forward(i, lt, h, sink)
    topk = torch.stack([routes[i] for i in moe_layers], dim=2)  # [W, T, L, k]
    return {"topk": topk, "num_experts": spec.num_experts,
            "layers": moe_layers, "model": os.path.basename(model_dir.rstrip("/")),
            "corpus": os.path.basename(corpus_file)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(SHARED, "models", "tiny-mixtral-32l"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--windows", type=int, default=8, help="512-token windows per corpus (default 8)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, file in CORPORA.items():
        trace = record(args.model, os.path.join(SHARED, "data", "corpora", file), args.windows)
        path = os.path.join(args.out, f"{name}.pt")
        torch.save(trace, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"{path}: {tuple(trace['topk'].shape)} (windows, tokens, layers, k)")


if __name__ == "__main__":
    main()
