"""Stage ``e2e``: a tiny MoE checkpoint, converted and generated offloaded vs all-resident.

Everything is made here, in a temporary directory: a tiny random Mixtral (``tests/tiny_models.py``,
transformers; 2 layers, 8 experts, top-2), calibration text (its corpus), ``haq convert --method rtn``
(MoE checkpoints need calibration text for their routing statistics). Then ``offline.generate`` (issue
20 item 3) decodes the same prompt greedily all-resident and offloaded (1 slot per layer under every
policy; half the experts under haq): the greedy tokens must be the same. On CUDA the offloaded run
computes some experts on the CPU, whose SiLU differs from the GPU's in the last bit (item 13); a
divergence is therefore excused only where the all-resident logits are tied within 1e-2 at that step,
and reported as such.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpucheck import plan  # noqa: E402
from gpucheck.common import Stage  # noqa: E402

PROMPT = [5, 17, 42, 99, 256, 300, 7, 12]  # token ids of the tiny 512-token vocabulary
NEW_TOKENS = 16
TIE = 1e-2


def convert(work: str) -> tuple[bool, str, dict]:
    from tiny_models import CORPUS, build_tiny_model

    from offline.cli import main as haq

    model = build_tiny_model("mixtral", os.path.join(work, "tiny-mixtral"))
    calib = os.path.join(work, "calib.txt")
    with open(calib, "w") as f:
        f.write("\n\n".join(CORPUS[i : i + 400] for i in range(0, len(CORPUS), 400)))
    out = os.path.join(work, "haq")
    rc = haq(["convert", model, out, "--method", "rtn", "--calib", calib, "--samples", "4", "--seq-len", "64",
              "--no-progress"])
    ok = rc == 0 and os.path.exists(os.path.join(out, "config.json"))
    return ok, f"haq convert --method rtn of a tiny Mixtral (2 layers, 8 experts, top-2): rc {rc}", {"dir": out}


def tie_margin(logits, step: int) -> float | None:
    """Top-1 minus top-2 logit of the all-resident run at generated position ``step`` (None if unknown)."""
    try:
        row = logits[step].float().reshape(-1)
        top = row.topk(2).values
        return float(top[0] - top[1])
    except Exception:  # noqa: BLE001 - logits not per generated step: no excuse for a divergence
        return None


def same_tokens(resident, got) -> tuple[bool, str]:
    a, b = list(resident.tokens), list(got.tokens)
    if a == b:
        return True, f"same {len(a)} greedy tokens"
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    gen_step = first - (len(PROMPT) if len(a) > NEW_TOKENS else 0)
    margin = tie_margin(resident.logits, gen_step) if gen_step >= 0 else None
    if margin is not None and margin < TIE:
        return True, f"tokens diverge at {first} where the all-resident top-2 logits tie (margin {margin:.1e})"
    return False, f"tokens diverge at position {first}: {a[first:first + 4]} vs {b[first:first + 4]}" + \
        (f" (top-2 margin {margin:.3g})" if margin is not None else "")


def stats_text(stats) -> str:
    if not isinstance(stats, dict):
        return ""
    keys = [k for k in ("hit_rate", "hits", "misses", "fetches", "cpu_experts", "prefetches") if k in stats]
    return "; " + ", ".join(f"{k} {stats[k]}" for k in keys) if keys else ""


def main() -> int:
    st = Stage("e2e")
    names = plan.checks("e2e")
    st.plan(names)
    import torch  # noqa: F401 - imported before transformers, as the converter does

    work = os.path.join(st.out, "work", "e2e")  # under --out: a killed stage leaves nothing in /tmp
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        converted: dict = {}

        def do_convert():
            ok, detail, data = convert(work)
            converted.update(data)
            return ok, detail, {}

        st.run("e2e/convert", do_convert)
        rest = names[1:]
        if "dir" not in converted:
            for n in rest:
                st.result(n, "FAIL", "no converted checkpoint")
            return st.finish()
        if importlib.util.find_spec("offline.generate") is None:
            for n in rest:
                st.result(n, "FAIL", plan.GENERATE_MISSING)
            return st.finish()
        from offline.generate import generate

        ckpt, dev = converted["dir"], st.device
        results: dict = {}

        def resident():
            r = generate(ckpt, list(PROMPT), NEW_TOKENS, device=dev, offload=None)
            results["resident"] = r
            n = len(r.tokens)
            ok = n >= NEW_TOKENS and all(isinstance(t, int) for t in r.tokens)
            return ok, f"{n} tokens on {dev}: ...{list(r.tokens)[-6:]}", {"tokens": list(r.tokens)}

        st.run("e2e/resident", resident)
        for run, cfg in plan.E2E_RUNS.items():
            if "resident" not in results:
                st.result(f"e2e/{run}", "FAIL", "no all-resident run to compare with")
                continue

            def offloaded(cfg=cfg):
                r = generate(ckpt, list(PROMPT), NEW_TOKENS, device=dev, offload=dict(cfg))
                ok, detail = same_tokens(results["resident"], r)
                text = f"{cfg}: {detail}" + stats_text(getattr(r, "offload_stats", None))
                return ok, text, {"tokens": list(r.tokens)}

            st.run(f"e2e/{run}", offloaded)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
