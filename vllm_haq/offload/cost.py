"""Cost model of serving a missed expert: fetch it into a slot, or compute its tokens on the CPU.

Calibrated once at engine start on this machine: host-to-device bandwidth from
timed copies of real experts into a cache slot, and CPU expert throughput from
timed runs of a real expert's int8 MLP at two token counts (a line: fixed
overhead plus time per token). DESIGN.md's H200 host: one Mixtral expert
(176 MB int8) is 3.3 ms over PCIe, and the CPU needs about as long for a few
tokens — so which is faster depends on the tokens routed, and both run at once.

Both CPU and prefetch costs are measured the way the engine pays them (a job handed
to a worker thread and waited for), so thread hand-off is part of the price: where
experts are small (the CPU build's "device" is host memory) it dominates, and the
planner then rightly prefers the device and skips prefetches that cannot pay off.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class CostModel:
    h2d_bytes_per_s: float  # measured copy bandwidth into a cache slot
    expert_bytes: int  # bytes of one expert (weights + scales)
    cpu_overhead_s: float  # CPU expert MLP: fixed cost per call
    cpu_s_per_token: float  # ... plus this per routed token
    prefetch_issue_s: float = 0.0  # model-thread cost of one asynchronous prefetch copy (hand-off, not the copy)

    def fetch_s(self) -> float:
        return self.expert_bytes / self.h2d_bytes_per_s

    def cpu_s(self, tokens: int) -> float:
        return self.cpu_overhead_s + tokens * self.cpu_s_per_token

    def prefetch_pays(self, p_used: float) -> bool:
        """Whether prefetching an expert used next with probability ``p_used`` saves more than it costs:
        a hit saves a demand fetch, the copy engine is otherwise idle during compute."""
        return p_used * self.fetch_s() > self.prefetch_issue_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fetch_ms"] = round(self.fetch_s() * 1e3, 4)
        d["cpu_ms_1_token"] = round(self.cpu_s(1) * 1e3, 4)
        d["prefetch_issue_ms"] = round(self.prefetch_issue_s * 1e3, 4)
        return d


def _best_of(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(copy_one: Callable[[], int], cpu_mlp: Callable[[int], None], device: torch.device,
              issue_prefetch: Callable[[], None], repeats: int = 3) -> CostModel:
    """Measure ``copy_one()`` (copies one expert, returns its bytes), ``cpu_mlp(tokens)`` (one expert's
    tokens on a CPU worker, waited for) and ``issue_prefetch()`` (an asynchronous copy, waited for)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    nbytes = copy_one()  # also warms the path up
    copy_s = max(_best_of(copy_one, repeats, sync), 1e-7)
    cpu_mlp(1)
    t1 = _best_of(lambda: cpu_mlp(1), repeats, lambda: None)
    t16 = _best_of(lambda: cpu_mlp(16), repeats, lambda: None)
    per_token = max((t16 - t1) / 15, 1e-8)
    issue_prefetch()
    if device.type == "cuda":  # the copy runs on its own stream: the model thread pays the launch only
        issue_s = _best_of(issue_prefetch, repeats, lambda: None)
    else:  # a copier thread: the model thread pays the hand-off around the copy
        issue_s = max(_best_of(issue_prefetch, repeats, sync) - copy_s, 0.0)
    return CostModel(h2d_bytes_per_s=nbytes / copy_s, expert_bytes=nbytes, cpu_overhead_s=max(t1 - per_token, 0.0),
                     cpu_s_per_token=per_token, prefetch_issue_s=issue_s)
