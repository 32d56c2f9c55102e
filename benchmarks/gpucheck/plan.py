"""What ``make gpu-check`` checks: stages, their time budgets, shapes and check names (no torch import).

The driver and the tests read the check names from here, so a stage that dies before reporting
still has each of its checks reported (as not reached), and the dry run is held to the same list.

Budgets are for one H200 (the whole run must fit 8 minutes): each stage's expected wall time on
an H200 is about half of its timeout. Dry mode (CPU) has its own, looser timeouts.
"""

from __future__ import annotations

# stage -> (timeout s on a GPU, timeout s in dry mode, what it does); run in this order
STAGES = {
    "kernels": (110, 150, "every int8 backend and the fused MoE against exact references at real shapes"),
    "graphs": (40, 60, "CUDA-graph capture/replay of the linear and the fused MoE equal to eager"),
    "offload": (80, 90, "offload engine, every policy and budget, equal to all-resident; sabotaged run caught"),
    "syncs": (40, 60, "blocking device->host syncs per MoE layer-step (torch.cuda.set_sync_debug_mode)"),
    "e2e": (60, 120, "tiny MoE converted, generated offloaded vs all-resident: same greedy tokens"),
    "benches": (300, 260, "reduced benchmarks/kernels.py and benchmarks/offload.py tables; the decode-step profile; "
                          "CPU experts on the host's cores"),
    # last: on a GPU the Mixtral-width conversion is the longest single step, and a slow one must not starve the
    # others of the total budget (expected ~100 s: two tiny conversions and evals, one 2.9 GB layer converted)
    "convert": (200, 120, "haq convert --device cuda vs cpu on a tiny MoE: same perplexity; a Mixtral-width layer "
                          "converted on cuda, timed"),
}
TOTAL_BUDGET_S = {"gpu": 530, "dry": 450}

# Linear weights [N, K] at real model shapes (q, k, v, o, one expert's fused gate+up, down).
LINEAR_SHAPES = {
    "mixtral-qo": (4096, 4096),
    "mixtral-kv": (1024, 4096),
    "mixtral-w13": (2 * 14336, 4096),
    "mixtral-w2": (4096, 14336),
    "qwen3-q": (4096, 2048),
    "qwen3-kv": (512, 2048),
    "qwen3-o": (2048, 4096),
    "qwen3-w13": (2 * 768, 2048),
    "qwen3-w2": (2048, 768),
    "opt66b-qkvo": (9216, 9216),
    "opt66b-fc1": (36864, 9216),
    "opt66b-fc2": (9216, 36864),
}
LINEAR_M = {"gpu": (1, 16, 17, 256, 4096), "dry": (1, 17)}
# MoE: (experts, top_k, hidden, intermediate); half the experts hold a cache slot
MOE_SHAPES = {"mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768)}
MOE_M = LINEAR_M
DRY_DIVISOR = 64  # dry mode divides hidden/intermediate sizes by this (the Triton interpreter is numpy)

GPU_BACKENDS = ("triton", "torch")  # plus "cutlass" where vLLM is importable
DRY_BACKENDS = ("triton", "torch")  # triton in the interpreter; plus "onednn" where vLLM's is exact

GRAPH_CASES = ("linear-triton", "linear-torch", "moe-triton")
GRAPH_M = (1, 16)

OFFLOAD_POLICIES = ("haq", "lru", "static")
OFFLOAD_BUDGETS = {"1slot": {"slots_per_layer": 1}, "half": {"expert_fraction": 0.5}}

SYNC_CASES = ("linear-triton", "moe-triton", "engine-resident", "engine-haq-1slot", "engine-lru-1slot",
              "engine-static-1slot")

E2E_RUNS = {"haq-1slot": {"policy": "haq", "slots_per_layer": 1}, "lru-1slot": {"policy": "lru", "slots_per_layer": 1},
            "static-1slot": {"policy": "static", "slots_per_layer": 1},
            "haq-half": {"policy": "haq", "expert_fraction": 0.5}}
GENERATE_MISSING = "offline.generate missing"

CONVERT_DEVICES = ("cpu", "device")  # the tiny MoE converted with --device cpu, then cuda (dry: cpu again)
CONVERT_PPL_REL = 1e-3  # perplexity of the two conversions within 0.1% (CUDA's float sums round differently)
# the Mixtral-width layer (hidden 4096, 8 experts of 14336, top-2): calibration windows x tokens, few to bound
# its time; the process converting it is killed after CONVERT_WIDE_TIMEOUT_S (the check fails, the stage goes on)
CONVERT_WIDE = {"gpu": {"samples": 16, "seq_len": 128}, "dry": {"samples": 4, "seq_len": 64}}
CONVERT_WIDE_TIMEOUT_S = 150


def dry_dim(n: int) -> int:
    return max(8, n // DRY_DIVISOR)


def checks(stage: str, backends: tuple[str, ...] = GPU_BACKENDS) -> list[str]:
    """The check names ``stage`` reports (``backends``: the linear backends this host runs)."""
    if stage == "kernels":
        return ([f"kernels/linear/{b}/{s}" for b in backends for s in LINEAR_SHAPES]
                + [f"kernels/moe/triton/{s}" for s in MOE_SHAPES])
    if stage == "graphs":
        return [f"graphs/{c}/M{m}" for c in GRAPH_CASES for m in GRAPH_M]
    if stage == "offload":
        return ([f"offload/{p}/{b}" for p in OFFLOAD_POLICIES for b in OFFLOAD_BUDGETS]
                + ["offload/delayed-copies", "offload/sabotage", "offload/pinned-in-place"])
    if stage == "syncs":
        return [f"syncs/{c}" for c in SYNC_CASES]
    if stage == "e2e":
        return ["e2e/convert", "e2e/resident"] + [f"e2e/{r}" for r in E2E_RUNS]
    if stage == "benches":
        return ["benches/kernels", "benches/offload", "benches/profile_step", "benches/cpu_experts"]
    if stage == "convert":
        return [f"convert/tiny-{d}" for d in CONVERT_DEVICES] + ["convert/agree", "convert/mixtral-width"]
    raise ValueError(stage)
