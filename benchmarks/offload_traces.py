"""Routing traces for ``benchmarks/offload.py``: recorded and synthetic traces of a Mixtral-shaped
MoE (8 experts, top-2), their locality, the planner's prior in the checkpoint's format, batches of token
streams, and Belady's misses (the oracle bound's cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_DIR = os.path.join(REPO, "benchmarks", "traces")
EXPERTS, TOP_K = 8, 2


def real_traces() -> dict[str, torch.Tensor]:
    if not all(os.path.exists(os.path.join(TRACE_DIR, f"{n}.pt")) for n in ("wiki", "sotu", "wiki-train")):
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "record_traces.py")], check=True)
    return {n: torch.load(os.path.join(TRACE_DIR, f"{n}.pt"))["topk"].long() for n in ("wiki", "sotu", "wiki-train")}


def synthetic_trace(windows: int, tokens: int, layers: int, seed: int, repeat: float = 0.12) -> torch.Tensor:
    """[W, T, L, k] routes with skewed per-layer popularity, layer-to-layer correlation and
    ``repeat`` chance of reusing the previous token's experts at a layer (Mixtral-like locality)."""
    g = torch.Generator().manual_seed(seed)
    pop = torch.distributions.Dirichlet(torch.full((EXPERTS,), 2.0)).sample((layers,))  # [L, E], fixed per model
    torch.manual_seed(seed)
    trans = torch.distributions.Dirichlet(torch.full((EXPERTS,), 0.7)).sample((layers, EXPERTS))  # [L, E, E]
    out = torch.zeros(windows, tokens, layers, TOP_K, dtype=torch.long)
    for w in range(windows):
        for t in range(tokens):
            prev_layer = None
            for layer in range(layers):
                if t > 0 and torch.rand(1, generator=g) < repeat:
                    out[w, t, layer] = out[w, t - 1, layer]
                else:
                    p = pop[layer] if prev_layer is None else 0.5 * pop[layer] + 0.5 * trans[layer, prev_layer]
                    out[w, t, layer] = torch.multinomial(p, TOP_K, generator=g)
                prev_layer = int(out[w, t, layer, 0])
    return out


def locality(trace: torch.Tensor) -> dict:
    """Same-top-1-as-previous-token rate and the mean per-layer top expert share."""
    top1 = trace[..., 0]
    same = (top1[:, 1:] == top1[:, :-1]).float().mean().item()
    counts = torch.zeros(trace.shape[2], EXPERTS)
    for layer in range(trace.shape[2]):
        counts[layer] = torch.bincount(trace[:, :, layer].reshape(-1), minlength=EXPERTS).float()
    share = (counts.max(1).values / counts.sum(1)).mean().item()
    return {"same_top1": round(same, 3), "top_share": round(share, 3)}


def prior_of(trace: torch.Tensor) -> dict[str, torch.Tensor]:
    """Routing statistics in the checkpoint's format (what `haq convert` records on calibration text)."""
    w, t, layers, k = trace.shape
    flat = trace.reshape(w * t, layers, k)
    routed = torch.zeros(w * t, layers, EXPERTS)
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


def belady_misses(routes: torch.Tensor, slots: list[int], start: int, steps: int) -> list[list[dict[int, int]]]:
    """Per step and layer, {missed expert: tokens} under Belady's MIN replacement (perfect future knowledge)."""
    batch, _, layers, _ = routes.shape
    result = [[{} for _ in range(layers)] for _ in range(steps)]
    for layer in range(layers):
        used = [set(routes[:, s, layer].reshape(-1).tolist()) for s in range(start + steps)]
        tokens = [torch.bincount(routes[:, s, layer].reshape(-1), minlength=EXPERTS).tolist()
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
