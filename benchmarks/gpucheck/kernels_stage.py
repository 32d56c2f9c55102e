"""Stage ``kernels``: every int8 linear backend and the fused Triton MoE against exact references.

Real shapes (Mixtral-8x7B, Qwen3-30B-A3B, OPT-66B) at M in {1, 16, 17, 256, 4096}; dry mode divides
the hidden sizes by 64, drops M = 4096 and runs Triton in its interpreter on the CPU. Per backend and
shape three things are checked, from the strictest:

* integer products bit-exact: int8 x int8 -> int32 against a float64 matmul (exact below 2**53), with
  unit scales so that the kernel's float32 output is the int32 sum rounded once (Triton), or the int32
  result itself (torch._int_mm / fp32-BLAS chunks);
* Triton's per-token quantization bit-exact with :func:`vllm_haq.quant.quantize_per_token`;
* the served bf16 linear (quantization + GEMM + scales + bias) within one bf16 ulp of
  :func:`vllm_haq.quant.w8a8_linear_reference` (float64 products), plus 1e-6 of max |y| for bias sums
  that cancel.

The fused MoE (cache slots: half the experts resident, the rest -1; ``out`` accumulated into) is held
to max |err| / max |ref| <= 1e-3 against a float64 per-slot loop: its SiLU uses Triton's approximate
``exp`` and division on CUDA (issue 20 item 13), which can flip a rare int8 rounding of the intermediate.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpucheck import plan  # noqa: E402
from gpucheck.common import LINEAR_ABS, LINEAR_ULPS, MOE_REL, MOE_REL_F32, Stage, fmt, max_rel_err, ulp_bound_ratio  # noqa: E402


def backends(st: Stage, torch) -> tuple[str, ...]:
    """The linear backends this host runs: Triton and torch always (Triton interpreted in dry mode), vLLM's
    CUTLASS where vLLM is importable on the GPU. Dry mode leaves vLLM's oneDNN out: importing vLLM alone
    takes ~12 s of the dry run's budget on a 2-core host (tests/test_quant_kernels.py covers it)."""
    if st.dry:
        return plan.DRY_BACKENDS
    found = plan.GPU_BACKENDS
    if importlib.util.find_spec("vllm") is not None:
        from vllm_haq.kernels.int8_gemm import _vllm_ops

        ops = _vllm_ops()
        if ops is not None and hasattr(ops, "cutlass_scaled_mm"):
            found += ("cutlass",)
    return found


def scales(torch, n: int, k: int, gen, device):
    """Per-channel weight scales that give outputs of order 1 for full-range int8 weights and randn inputs."""
    return ((torch.rand(n, 1, generator=gen, device=device) * 0.5 + 0.75) / (40 * math.sqrt(k))).float()


def activations(torch, m: int, k: int, gen, device):
    x = torch.randn(m, k, generator=gen, device=device)
    x[:, :: max(1, k // 8)] *= 20  # a few outlier channels, as in real activations
    return x.to(torch.bfloat16)


def linear_shape(st: Stage, torch, name: str, n: int, k: int, ms, names: list[str]) -> None:
    """Report ``kernels/linear/<backend>/<name>`` for every backend (one reference per M, shared)."""
    from vllm_haq.kernels import ScaledInt8Gemm
    from vllm_haq.kernels.int8_gemm import exact_int8_mm
    from vllm_haq.quant import quantize_per_token, w8a8_linear_reference

    dev = st.device
    gen = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen, device=dev)
    w_s = scales(torch, n, k, gen, dev)
    bias = (torch.randn(n, generator=gen, device=dev) * 0.5).to(torch.bfloat16) if name.startswith("opt") else None
    state = {}
    for check in names:
        b = check.split("/")[2]
        try:
            state[b] = {"gemm": ScaledInt8Gemm(w_q, w_s, torch.bfloat16, backend=b), "worst": 0.0, "fails": [],
                        "ints": b in ("triton", "torch"), "quant": b == "triton"}
        except Exception as exc:  # noqa: BLE001
            state[b] = {"error": f"{type(exc).__name__}: {exc}"}
    eps = torch.finfo(torch.bfloat16).eps
    for m in ms:
        x = activations(torch, m, k, gen, dev)
        ref = w8a8_linear_reference(x, w_q, w_s, bias)
        x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen, device=dev)
        int_ref = x_q.double() @ w_q.double().t()  # exact: |sum| < 2**53
        q_ref = quantize_per_token(x)
        for b, s in state.items():
            if "error" in s:
                continue
            try:
                r = ulp_bound_ratio(s["gemm"](x, bias), ref, LINEAR_ULPS, eps, LINEAR_ABS)
                s["worst"] = max(s["worst"], r)
                if not r <= 1.0:
                    s["fails"].append(f"M={m}: linear err {fmt(r)} x bound")
                if s["ints"] and not integers_exact(torch, b, x_q, w_q, int_ref, exact_int8_mm):
                    s["fails"].append(f"M={m}: int32 products not exact")
                if s["quant"]:
                    from vllm_haq.kernels.triton_quant import triton_quantize_per_token

                    q, qs = triton_quantize_per_token(x)
                    if not (torch.equal(q, q_ref[0]) and torch.equal(qs, q_ref[1])):
                        s["fails"].append(f"M={m}: quantization differs in {int((q != q_ref[0]).sum())} int8 "
                                          f"values and {int((qs != q_ref[1]).sum())} of {m} scales")
            except Exception as exc:  # noqa: BLE001
                s["fails"].append(f"M={m}: {type(exc).__name__}: {exc}")
        del ref, int_ref, x_q
    for b, s in state.items():
        check = f"kernels/linear/{b}/{name}"
        if "error" in s:
            st.result(check, "FAIL", s["error"])
            continue
        what = ["linear within 1 bf16 ulp (worst " + fmt(s["worst"]) + " of the bound)"]
        what += ["int32 exact"] if s["ints"] else []
        what += ["quant exact"] if s["quant"] else []
        detail = f"[{n}x{k}] M={','.join(map(str, ms))}: " + ("; ".join(s["fails"]) if s["fails"] else ", ".join(what))
        st.result(check, "FAIL" if s["fails"] else "ok", detail, worst_bound_ratio=s["worst"])


def integers_exact(torch, backend: str, x_q, w_q, int_ref, exact_int8_mm) -> bool:
    if backend == "triton":
        from vllm_haq.kernels.triton_gemm import triton_scaled_int8_mm

        ones_m = torch.ones(x_q.shape[0], 1, device=x_q.device)
        ones_n = torch.ones(w_q.shape[0], 1, device=x_q.device)
        got = triton_scaled_int8_mm(x_q, ones_m, w_q, ones_n, out_dtype=torch.float32)
        return torch.equal(got, int_ref.float())  # the int32 sum, rounded once to float32 (RNE both sides)
    return torch.equal(exact_int8_mm(x_q, w_q.t()).long(), int_ref.long())


def moe_case(torch, experts: int, top_k: int, hidden: int, inter: int, m: int, gen, dev):
    """Random slots (half the experts resident, shuffled), routing and ``out``: (inputs, float64 reference,
    the per-expert float32 path's result)."""
    import torch.nn.functional as F

    from vllm_haq.kernels import ScaledInt8Gemm
    from vllm_haq.quant import w8a8_linear_reference

    slots = experts // 2
    w13 = torch.randint(-127, 128, (slots, 2 * inter, hidden), dtype=torch.int8, generator=gen, device=dev)
    w13_s = torch.stack([scales(torch, 2 * inter, hidden, gen, dev) for _ in range(slots)])
    w2 = torch.randint(-127, 128, (slots, hidden, inter), dtype=torch.int8, generator=gen, device=dev)
    w2_s = torch.stack([scales(torch, hidden, inter, gen, dev) for _ in range(slots)])
    perm = torch.randperm(experts, generator=torch.Generator().manual_seed(m))
    e2s = torch.full((experts,), -1, dtype=torch.int32)
    e2s[perm[:slots]] = torch.arange(slots, dtype=torch.int32)
    e2s = e2s.to(dev)
    logits = torch.randn(m, experts, generator=gen, device=dev) * 2
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    x = activations(torch, m, hidden, gen, dev)
    out0 = torch.randn(m, hidden, generator=gen, device=dev)
    ref, ref32 = out0.double().clone(), out0.clone()
    slot_of_route = e2s.long()[ids.reshape(-1).long()]
    flat_w = weights.reshape(-1)
    for s in range(slots):
        routes = (slot_of_route == s).nonzero().squeeze(1)
        if routes.numel() == 0:
            continue
        t = routes // top_k
        gu = w8a8_linear_reference(x[t].float(), w13[s], w13_s[s])
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        ref.index_add_(0, t, w8a8_linear_reference(h, w2[s], w2_s[s]).double() * flat_w[routes, None].double())
        gu = ScaledInt8Gemm(w13[s], w13_s[s], torch.float32, backend="torch")(x[t])
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = ScaledInt8Gemm(w2[s], w2_s[s], torch.float32, backend="torch")(h)
        ref32.index_add_(0, t, y * flat_w[routes, None])
    return (x, weights, ids.int(), e2s, w13, w13_s, w2, w2_s, out0), ref, ref32


def moe_shape(st: Stage, torch, name: str, shape, ms) -> tuple[bool, str, dict]:
    from vllm_haq.kernels import triton_int8_moe_forward

    experts, top_k, hidden, inter = shape
    if st.dry:  # the interpreter runs each Triton program as numpy: fewer experts too (128 -> 16)
        experts, hidden, inter = min(experts, 16), plan.dry_dim(hidden), plan.dry_dim(inter)
    gen = torch.Generator(device=st.device).manual_seed(len(name))
    worst, worst32, fails = 0.0, 0.0, []
    for m in ms:
        (x, w, ids, e2s, w13, w13_s, w2, w2_s, out0), ref, ref32 = moe_case(torch, experts, top_k, hidden, inter,
                                                                             m, gen, st.device)
        out = out0.clone()
        got = triton_int8_moe_forward(x, w, ids, e2s, w13, w13_s, w2, w2_s, out=out)
        err, err32 = max_rel_err(got, ref), max_rel_err(got, ref32)
        worst, worst32 = max(worst, err), max(worst32, err32)
        if got.data_ptr() != out.data_ptr():
            fails.append(f"M={m}: did not accumulate into out")
        if not err <= MOE_REL:
            fails.append(f"M={m}: max rel err {fmt(err)} > {MOE_REL:g} (float64 reference)")
        if not err32 <= MOE_REL_F32[st.mode]:
            fails.append(f"M={m}: max rel err {fmt(err32)} > {MOE_REL_F32[st.mode]:g} (per-expert float32 path)")
        del x, ids, w13, w2, ref, ref32, got, out
    detail = (f"[E={experts} top-{top_k} H={hidden} I={inter}, {experts // 2} slots] M={','.join(map(str, ms))}: "
              + ("; ".join(fails) if fails else f"max rel err {fmt(worst)} <= {MOE_REL:g} (float64 reference), "
                 f"{fmt(worst32)} <= {MOE_REL_F32[st.mode]:g} (per-expert float32 path)"))
    return not fails, detail, {"max_rel_err": worst, "max_rel_err_f32": worst32}


def main() -> int:
    st = Stage("kernels")
    if st.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # this process only, before Triton's first import
    import torch

    found = backends(st, torch)
    names = plan.checks("kernels", found)
    st.plan(names)
    ms = plan.LINEAR_M[st.mode]
    for name, (n, k) in plan.LINEAR_SHAPES.items():
        if st.dry:
            n, k = plan.dry_dim(n), plan.dry_dim(k)
        mine = [c for c in names if c.startswith("kernels/linear/") and c.endswith("/" + name)]
        try:
            linear_shape(st, torch, name, n, k, ms, mine)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the data: this shape fails
            for c in mine:
                st.result(c, "FAIL", f"{type(exc).__name__}: {exc}")
        if not st.dry:
            torch.cuda.empty_cache()
    for name, shape in plan.MOE_SHAPES.items():
        st.run(f"kernels/moe/triton/{name}", moe_shape, st, torch, name, shape, plan.MOE_M[st.mode])
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
