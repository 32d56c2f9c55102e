"""Shared by the stages: the RESULT protocol, error measures, tolerances and process set-up.

A stage prints ``PLAN <check>`` for every check it will report, then one
``RESULT <check> ok|FAIL|skip <detail>`` line per check (the driver collects them; a
check planned but never reported is a FAIL), and writes ``<out>/stages/<stage>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRY_SKIP = "(dry: needs CUDA)"

# Tolerances (item 13 of issue 20: on CUDA, Triton's exp and division are approximate, so GPU results are
# compared within stated bounds; int32 products and the per-token quantization are exact everywhere).
LINEAR_ULPS = 1.0  # dequantized bf16 linear output: within one bf16 ulp of the float64-exact reference ...
LINEAR_ABS = 1e-6  # ... plus 1e-6 of the largest |output| (float32 epilogue of cancelling bias sums)
# fused MoE, max |err| / max |ref|, against two references:
# - the per-expert float32 path (ScaledInt8Gemm "torch" + F.silu), the same arithmetic as the kernel (libdevice
#   expf, correctly rounded division): only the order of the route sums differs;
MOE_REL_F32 = {"gpu": 1e-5, "dry": 1e-3}  # (the interpreter's numpy exp is not torch's: rare roundings of h flip)
# - the float64 reference: its gate/up are rounded once, not twice as in float32, so rare int8 roundings of h
#   flip, and one flip moves an output by up to 127 * s_h * s_w2 (4.9e-3 and 7.9e-3 at M=4096 on an H200)
MOE_REL = 2e-2
# engine on CUDA, bf16 out: an expert served on the CPU rounds its bf16 SiLU output (and so maybe the row max that
# sets h's int8 scale) one ulp (2**-8) away from the GPU's, then its bf16 output once more: ~3 * 2**-8 at worst
OFFLOAD_REL_CUDA = 2e-2
OFFLOAD_REL_CPU = 0.0  # engine on the CPU: every path is the same CPU arithmetic, bit for bit


STALL_ENV = "HAQ_GPU_CHECK_STALL"


class Stage:
    """One stage process: arguments, device, the RESULT lines and the stage's JSON file."""

    def __init__(self, name: str, argv: list[str] | None = None):
        p = argparse.ArgumentParser(description=f"gpu-check stage {name}")
        p.add_argument("--mode", choices=("gpu", "dry"), required=True)
        p.add_argument("--out", required=True)
        args = p.parse_args(argv)
        self.name, self.mode, self.out = name, args.mode, os.path.abspath(args.out)
        self.dry = self.mode == "dry"
        self.results: list[dict] = []
        self.planned: list[str] = []
        self.t0 = time.monotonic()
        os.makedirs(os.path.join(self.out, "stages"), exist_ok=True)
        for path in (REPO, os.path.join(REPO, "tests")):
            if path not in sys.path:
                sys.path.insert(0, path)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def plan(self, names: list[str]) -> None:
        self.planned += names
        for n in names:
            print(f"PLAN {n}", flush=True)

    def result(self, check: str, status: str, detail: str = "", **data) -> None:
        assert status in ("ok", "FAIL", "skip"), status
        detail = " ".join(str(detail).split())  # one line
        print(f"RESULT {check} {status} {detail}".rstrip(), flush=True)
        self.results.append({"check": check, "status": status, "detail": detail, **data})

    def run(self, check: str, fn, *args, **kwargs) -> None:
        """``fn(...)`` -> (ok: bool, detail, data dict); an exception is this check's FAIL, not the stage's end.

        ``$HAQ_GPU_CHECK_STALL`` naming ``check``: the check hangs instead (tests/test_gpu_check.py: a stage
        that never finishes, whatever the host's speed; a dry e2e stage ran in 6 s on an AVX-512 host)."""
        if os.environ.get(STALL_ENV) == check:
            time.sleep(3600)
        t0 = time.monotonic()
        try:
            ok, detail, data = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, and the next check runs
            traceback.print_exc()
            ok, detail, data = False, f"{type(exc).__name__}: {exc}", {}
        self.result(check, "ok" if ok else "FAIL", detail, seconds=round(time.monotonic() - t0, 2), **data)

    def skip_all(self, names: list[str], why: str = DRY_SKIP) -> None:
        for n in names:
            self.result(n, "skip", why)

    def finish(self) -> int:
        with open(os.path.join(self.out, "stages", f"{self.name}.json"), "w") as f:
            json.dump({"stage": self.name, "mode": self.mode, "seconds": round(time.monotonic() - self.t0, 2),
                       "results": self.results}, f, indent=1, default=str)
        return 0


def max_rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| in float64; inf where ``got`` is not finite (garbage or NaN must fail)."""
    got, ref = got.double(), ref.double()
    if not bool(got.isfinite().all()):
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)) if ref.numel() else 0.0


def ulp_bound_ratio(got, ref, ulps: float, eps: float, abs_frac: float) -> float:
    """max over elements of |got - ref| / (ulps * eps * |ref| + abs_frac * max|ref|): <= 1 within the bound."""
    got, ref = got.double(), ref.double()
    if not bool(got.isfinite().all()):
        return float("inf")
    bound = ulps * eps * ref.abs() + abs_frac * float(ref.abs().max()) + 1e-30
    return float(((got - ref).abs() / bound).max()) if ref.numel() else 0.0


def fmt(x: float) -> str:
    return f"{x:.2e}" if x == x and x not in (float("inf"),) else str(x)
