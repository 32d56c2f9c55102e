"""Routing traces for ``benchmarks/offload.py``: its topologies, recorded traces of a Mixtral-shaped MoE (8
experts, top-2) and synthetic traces of any topology, their locality, the planner's prior in the checkpoint's
format, batches of token streams, Belady's misses and the oracle bound built on them."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_DIR = os.path.join(REPO, "benchmarks", "traces")
# MoE layers, routed experts, top-k, and the shapes of one expert: full size (cuda) and scaled down to hidden 256
# in the same proportion (cpu). DeepSeek-V2-Lite: its first layer is dense and its 2 shared experts per layer
# are dense MLPs vLLM computes beside the MoE method (always resident), so only the routed experts are served.
TOPOLOGIES = {
    "mixtral-8x7b": dict(layers=32, experts=8, top_k=2, cuda=(4096, 14336), cpu=(256, 896)),
    "qwen3-30b-a3b": dict(layers=48, experts=128, top_k=8, cuda=(2048, 768), cpu=(256, 96)),
    "deepseek-v2-lite": dict(layers=26, experts=64, top_k=6, cuda=(2048, 1408), cpu=(256, 176)),
}
RECORDED = "mixtral-8x7b"  # the recorded traces' topology (tiny-mixtral-32l: 8 experts, top-2)


def real_traces() -> dict[str, torch.Tensor]:
    if not all(os.path.exists(os.path.join(TRACE_DIR, f"{n}.pt")) for n in ("wiki", "sotu", "wiki-train")):
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "record_traces.py")], check=True)
    return {n: torch.load(os.path.join(TRACE_DIR, f"{n}.pt"))["topk"].long() for n in ("wiki", "sotu", "wiki-train")}


def synthetic_trace(windows: int, tokens: int, layers: int, seed: int, repeat: float = 0.12, experts: int = 8,
                    top_k: int = 2) -> torch.Tensor:
    """[W, T, L, k] routes with skewed per-layer popularity, layer-to-layer correlation and
    ``repeat`` chance of reusing the previous token's experts at a layer (Mixtral-like locality)."""
    g = torch.Generator().manual_seed(seed)
    pop = torch.distributions.Dirichlet(torch.full((experts,), 2.0)).sample((layers,))  # [L, E], fixed per model
    torch.manual_seed(seed)
    trans = torch.distributions.Dirichlet(torch.full((experts,), 0.7)).sample((layers, experts))  # [L, E, E]
    out = torch.zeros(windows, tokens, layers, top_k, dtype=torch.long)
    for w in range(windows):
        for t in range(tokens):
            prev_layer = None
            for layer in range(layers):
                if t > 0 and torch.rand(1, generator=g) < repeat:
                    out[w, t, layer] = out[w, t - 1, layer]
                else:
                    p = pop[layer] if prev_layer is None else 0.5 * pop[layer] + 0.5 * trans[layer, prev_layer]
                    out[w, t, layer] = torch.multinomial(p, top_k, generator=g)
                prev_layer = int(out[w, t, layer, 0])
    return out


def locality(trace: torch.Tensor, experts: int) -> dict:
    """Same-top-1-as-previous-token rate and the mean per-layer top expert share."""
    top1 = trace[..., 0]
    same = (top1[:, 1:] == top1[:, :-1]).float().mean().item()
    counts = torch.zeros(trace.shape[2], experts)
    for layer in range(trace.shape[2]):
        counts[layer] = torch.bincount(trace[:, :, layer].reshape(-1), minlength=experts).float()
    share = (counts.max(1).values / counts.sum(1)).mean().item()
    return {"same_top1": round(same, 3), "top_share": round(share, 3)}


def prior_of(trace: torch.Tensor, experts: int) -> dict[str, torch.Tensor]:
    """Routing statistics in the checkpoint's format (what `haq convert` records on calibration text)."""
    w, t, layers, k = trace.shape
    flat = trace.reshape(w * t, layers, k)
    routed = torch.zeros(w * t, layers, experts)
    routed.scatter_(2, flat, 1.0)
    counts = routed.sum(0).long()
    trans = torch.einsum("nla,nlb->lab", routed[:, :-1], routed[:, 1:]).long()
    return {"expert_counts": counts, "transition_counts": trans, "layer_indices": torch.arange(layers)}


def streams(trace: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch, steps, L, k]: ``batch`` independent token streams cut from the trace's windows."""
    w, t, layers, k = trace.shape
    flat = trace.reshape(w * t, layers, k)
    per = (w * t) // batch
    return flat[: per * batch].reshape(batch, per, layers, k)


def belady_misses(routes: torch.Tensor, slots: list[int], start: int, steps: int, experts: int
                  ) -> list[list[dict[int, int]]]:
    """Per step and layer, {missed expert: tokens} under Belady's MIN replacement (perfect future knowledge)."""
    batch, _, layers, _ = routes.shape
    result = [[{} for _ in range(layers)] for _ in range(steps)]
    for layer in range(layers):
        used = [set(routes[:, s, layer].reshape(-1).tolist()) for s in range(start + steps)]
        tokens = [torch.bincount(routes[:, s, layer].reshape(-1), minlength=experts).tolist()
                  for s in range(start + steps)]
        cache: set[int] = set()
        for s in range(start + steps):
            for e in sorted(used[s]):
                if e in cache:
                    continue
                if s >= start:
                    result[s - start][layer][e] = tokens[s][e]
                if slots[layer] == 0:
                    continue
                if len(cache) >= slots[layer]:
                    def next_use(c):
                        return next((u for u in range(s + 1, start + steps) if c in used[u]), 1 << 30)
                    victims = [c for c in cache if c not in used[s]] or list(cache)
                    cache.remove(max(victims, key=next_use))
                cache.add(e)
    return result


def oracle_bound(resident_ms: float, misses, cost: dict, layers: int, steps: int) -> dict:
    """Belady's misses of each layer-step split over copy engine and CPU at the measured costs (largest first,
    each to the side that finishes it sooner), hidden behind one layer of resident compute."""
    fetch_s = cost["expert_bytes"] / cost["h2d_bytes_per_s"]
    window = resident_ms / 1e3 / layers  # one layer of resident compute per step
    extra = 0.0
    for step in misses:
        for layer_misses in step:
            pcie = cpu = 0.0
            for e, n in sorted(layer_misses.items(), key=lambda kv: -kv[1]):
                tc = cost["cpu_overhead_s"] + n * cost["cpu_s_per_token"]
                tc += 0.0 if cpu else cost.get("cpu_call_s", 0.0)  # a layer-step's CPU experts are one call
                if pcie + fetch_s <= cpu + tc:
                    pcie += fetch_s
                else:
                    cpu += tc
            extra += max(0.0, max(pcie, cpu) - window)
    total_misses = sum(len(m) for step in misses for m in step)
    return {"ms_per_step": resident_ms + extra / steps * 1e3, "miss_per_step": total_misses / steps}
