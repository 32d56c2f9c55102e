"""Cost model of serving a missed expert: fetch it into a slot, or compute its tokens on the CPU.

Calibrated once at engine start on this machine: host-to-device bandwidth from
timed copies of real experts into a cache slot, and CPU expert throughput from
timed calls of real experts' int8 MLPs: one expert at 1 and 16 tokens, and
CPU_CALL_EXPERTS experts in one call (a layer-step's CPU experts are one call:
its fixed cost, the hand-off to a worker and the start of its thread team, is
paid once per layer-step, and each expert in it costs reading its weights plus
time per token). The H200 host of docs/architecture.md: one Mixtral expert
(176 MB int8) is 3.3 ms over PCIe, and the CPU needs about as long for a few
tokens — so which is faster depends on the tokens routed, and both run at once.

Both CPU and prefetch costs are measured the way the engine pays them (a job handed
to a worker thread and waited for), so thread hand-off is part of the price: where
experts are small (the CPU build's "device" is host memory) it dominates, and the
planner then rightly prefers the device and skips prefetches that cannot pay off.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch


@dataclass
class CostModel:
    h2d_bytes_per_s: float  # measured copy bandwidth into a cache slot
    expert_bytes: int  # bytes of one expert (weights + scales)
    cpu_overhead_s: float  # CPU expert MLP: fixed cost of each expert in a layer-step's call ...
    cpu_s_per_token: float  # ... plus this per routed token
    prefetch_issue_s: float = 0.0  # model-thread cost of one asynchronous prefetch copy (hand-off, not the copy)
    device_overhead_s: float = 0.0  # device expert MLP from a slot: fixed cost per call (tiny on a GPU) ...
    device_s_per_token: float = 0.0  # ... plus this per routed token
    cpu_call_s: float = 0.0  # fixed cost of the one call serving a layer-step's CPU experts, once per layer-step

    def fetch_s(self) -> float:
        return self.expert_bytes / self.h2d_bytes_per_s

    def cpu_s(self, tokens: int) -> float:
        """One more expert in a layer-step's CPU call (the call's own cost: ``cpu_call_s``)."""
        return self.cpu_overhead_s + tokens * self.cpu_s_per_token

    def device_s(self, tokens: int) -> float:
        return self.device_overhead_s + tokens * self.device_s_per_token

    def miss_s(self, tokens: int) -> float:
        """A miss served the cheaper way: on the CPU, or fetched and then computed on the device."""
        return min(self.cpu_call_s + self.cpu_s(tokens), self.fetch_s() + self.device_s(tokens))

    def prefetch_pays(self, p_used: float) -> bool:
        """Whether prefetching an expert used next with probability ``p_used`` saves more than issuing it
        costs the model thread: a hit saves the miss path over the device compute (the copy engine is
        otherwise idle while layers compute)."""
        return p_used * (self.miss_s(1) - self.device_s(1)) > self.prefetch_issue_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fetch_ms"] = round(self.fetch_s() * 1e3, 4)
        d["cpu_ms_1_token"] = round(self.cpu_s(1) * 1e3, 4)
        d["cpu_call_ms"] = round(self.cpu_call_s * 1e3, 4)
        d["prefetch_issue_ms"] = round(self.prefetch_issue_s * 1e3, 4)
        d["device_ms_1_token"] = round(self.device_s(1) * 1e3, 4)
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


def _line(mlp: Callable[[int], None], repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(fixed s, s per token) of ``mlp(tokens)`` from timings at 1 and 16 tokens."""
    mlp(1)
    t1 = _best_of(lambda: mlp(1), repeats, sync)
    t16 = _best_of(lambda: mlp(16), repeats, sync)
    per_token = max((t16 - t1) / 15, 1e-8)
    return max(t1 - per_token, 0.0), per_token


CPU_CALL_EXPERTS = 8  # experts in the calibration's many-expert call (Qwen3's and DeepSeek-V3's top-8)


def cpu_costs(t1: float, t16: float, tk: float, k: int) -> tuple[float, float, float]:
    """(call s, per-expert s, per-token s) from the times of one call with one expert at 1 token (``t1``) and at
    16 tokens (``t16``), and with ``k`` experts at 1 token each (``tk``): t(n experts, m tokens each) = call +
    n·(per expert + m·per token). Noise never makes a part negative (a negative part is 0)."""
    per_token = max((t16 - t1) / 15, 1e-8)
    one_expert = max((tk - t1) / (k - 1), per_token) if k > 1 else t1  # an expert more, at one token
    return max(t1 - one_expert, 0.0), one_expert - per_token, per_token


def cold_experts(layers: Sequence, k: int = 1) -> Iterator[tuple[object, list[int]]]:
    """(layer, k of its experts) for each timed CPU call: every expert of every layer in turn, so that an expert
    comes back only after all the others, from DRAM as in decode (where all experts exceed the host's caches).

    Timing one expert again and again times it from the last-level cache: on the H200 host (300 MiB L3) a
    176 MB Mixtral expert stays there, and the first GPU run (make gpu-check, 2026-12-04) calibrated 3.0 ms
    per CPU expert against 3.2 ms per fetch, so the planner sent misses to a CPU slower than it measured."""
    return itertools.cycle([(layer, [(e + i) % layer.num_experts for i in range(min(k, layer.num_experts))])
                            for layer in layers for e in range(0, layer.num_experts, k)])


def calibrate(copy_one: Callable[[], int], cpu_mlp: Callable[[int, int], None], device: torch.device,
              issue_prefetch: Callable[[], None], device_mlp: Callable[[int], None], repeats: int = 3,
              cpu_call_experts: int = CPU_CALL_EXPERTS) -> CostModel:
    """Measure ``copy_one()`` (copies one expert, returns its bytes), ``cpu_mlp(tokens, experts)`` (that many
    experts' tokens each, as one layer-step's CPU job on a worker, waited for), ``issue_prefetch()`` (an
    asynchronous copy, waited for) and ``device_mlp(tokens)`` (one expert's tokens computed from a cache slot)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    nbytes = copy_one()  # also warms the path up
    copy_s = max(_best_of(copy_one, repeats, sync), 1e-7)
    k = max(cpu_call_experts, 1)
    cpu_mlp(1, 1)
    times = [_best_of(lambda t=t, n=n: cpu_mlp(t, n), repeats, lambda: None) for t, n in ((1, 1), (16, 1), (1, k))]
    call_s, cpu_fixed, per_token = cpu_costs(*times, k)
    device_fixed, device_per_token = _line(device_mlp, repeats, sync)
    issue_prefetch()
    if device.type == "cuda":  # the copy runs on its own stream: the model thread pays the launch only
        issue_s = _best_of(issue_prefetch, repeats, lambda: None)
    else:  # a copier thread: the model thread pays the hand-off around the copy
        issue_s = max(_best_of(issue_prefetch, repeats, sync) - copy_s, 0.0)
    return CostModel(h2d_bytes_per_s=nbytes / copy_s, expert_bytes=nbytes, cpu_overhead_s=cpu_fixed,
                     cpu_s_per_token=per_token, prefetch_issue_s=issue_s, device_overhead_s=device_fixed,
                     device_s_per_token=device_per_token, cpu_call_s=call_s)
