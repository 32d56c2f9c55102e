"""Python API: an MoE HAQ checkpoint served by vLLM with only part of its experts on the device.

    python examples/offload_python.py CKPT [--slots 2] [--policy haq]

Every MoE layer keeps ``slots_per_layer`` experts in the device cache; the others stay
in host memory and are computed by CPU workers or swapped in, as the planner decides
from the checkpoint's routing statistics (see docs/offloading.md). The same
settings work as ``additional_config`` of ``vllm serve`` or as HAQ_* environment variables.
On the CPU build the "device" is the CPU too: this shows the API and the statistics,
not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="HAQ checkpoint of an MoE model (haq convert output)")
    ap.add_argument("--slots", type=int, default=2, help="experts per MoE layer kept on the device")
    ap.add_argument("--policy", default="haq", choices=("haq", "lru", "static"))
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams

    from vllm_haq.vllm.engine_stats import offload_stats

    llm = LLM(model=args.checkpoint, quantization="haq", max_model_len=256, gpu_memory_utilization=0.3,
              enforce_eager=True,
              additional_config={"haq": {"slots_per_layer": args.slots, "policy": args.policy}})
    prompts = args.prompt or ["The history of the city begins", "In the year 1900, the president"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    for p, o in zip(prompts, outs):
        print(f"{p!r} -> {o.outputs[0].text!r}")
    for rank, stats in enumerate(offload_stats(llm)):  # one entry per worker (tensor-parallel rank)
        print(f"offload statistics (worker {rank}): {json.dumps(stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
