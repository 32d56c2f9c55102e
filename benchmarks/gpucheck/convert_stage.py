"""Stage ``convert``: ``haq convert --device cuda`` (issue 24 item 1) against the CPU, and timed at Mixtral width.

(a) A tiny random Mixtral (``tests/tiny_models.py``: 2 layers, 8 experts, top-2) and its calibration text, made
here, are converted with ``--method haq --device cpu`` and ``--device cuda`` (dry mode: ``--device cpu`` twice).
The two checkpoints must agree: perplexity through the pure-PyTorch reference (``haq eval --backend hf``'s
``offline.perplexity``) within ``plan.CONVERT_PPL_REL``. Not bit for bit: CUDA sums floats in another order and
factorizes GPTQ's Hessians with torch.linalg where the CPU uses LAPACK, so a few int8 weights within float error of
a half round the other way (and a near-tied smoothing choice could flip); the largest |difference| of the int8
weights, the fraction that differ and whether the smoothing/rotation choices are the same are reported.

(b) One decoder layer at Mixtral-8x7B width (hidden 4096, 32/8 heads, 8 experts of intermediate 14336, top-2;
``benchmarks/synthetic_mixtral.py``'s config, random bf16 weights made here on the GPU, the tiny tokenizer, a
512-token vocabulary) is converted with ``--method haq --device cuda`` in a child process, killed after
``plan.CONVERT_WIDE_TIMEOUT_S``, on ``plan.CONVERT_WIDE`` calibration windows (few, to bound the time): wall
seconds, peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host RSS (the child's ``ru_maxrss``) go
into ``stages/convert.json``. Dry mode runs the same at ``plan.dry_dim`` widths on the CPU, so that the driver's
code runs; its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpucheck import plan  # noqa: E402
from gpucheck.common import REPO, Stage  # noqa: E402

TINY = {"samples": 8, "seq_len": 64}
EVAL_SEQ_LEN = 64
WIDE_CHILD = "--wide-child"


def write_calibration(path: str) -> str:
    from tiny_models import CORPUS

    with open(path, "w") as f:
        f.write("\n\n".join(CORPUS[i : i + 400] for i in range(0, len(CORPUS), 400)))
    return path


def convert_tiny(model: str, calib: str, out: str, device: str) -> tuple[bool, str, dict]:
    from offline.cli import main as haq

    t0 = time.monotonic()
    rc = haq(["convert", model, out, "--method", "haq", "--calib", calib, "--samples", str(TINY["samples"]),
              "--seq-len", str(TINY["seq_len"]), "--device", device, "--no-progress"])
    wall = time.monotonic() - t0
    ok = rc == 0 and os.path.exists(os.path.join(out, "config.json"))
    return ok, f"haq convert --method haq --device {device} of a tiny Mixtral: rc {rc}, {wall:.1f} s", \
        {"device": device, "wall_s": round(wall, 2)}


def perplexity(ckpt: str, calib: str) -> float:
    from offline.perplexity import eval_token_windows, hf_token_nll, summarize

    windows = eval_token_windows(ckpt, calib, EVAL_SEQ_LEN)
    return float(summarize(hf_token_nll(ckpt, windows))["ppl"])


def int8_differences(a: str, b: str) -> tuple[int, float]:
    """The largest |difference| of the two checkpoints' int8 tensors and the fraction of their values that differ."""
    import torch
    from safetensors.torch import load_file

    worst, differing, total = 0, 0, 0
    for shard in sorted(f for f in os.listdir(a) if f.startswith("model-") and f.endswith(".safetensors")):
        ta, tb = load_file(os.path.join(a, shard)), load_file(os.path.join(b, shard))
        for name, t in ta.items():
            if t.dtype == torch.int8:
                d = (t.int() - tb[name].int()).abs()
                worst, differing, total = max(worst, int(d.max())), differing + int((d > 0).sum()), total + t.numel()
    return worst, differing / max(total, 1)


def agree(dirs: dict[str, str], calib: str) -> tuple[bool, str, dict]:
    ppl = {d: perplexity(path, calib) for d, path in dirs.items()}
    rel = abs(ppl["device"] / ppl["cpu"] - 1.0)
    worst, frac = int8_differences(dirs["cpu"], dirs["device"])
    qcfg = [json.load(open(os.path.join(p, "config.json")))["quantization_config"] for p in dirs.values()]
    choices = [(q["smoothing"], q.get("input_rotation")) for q in qcfg]
    same = choices[0] == choices[1]
    ok = rel <= plan.CONVERT_PPL_REL
    return ok, (f"perplexity cpu {ppl['cpu']:.4f} vs device {ppl['device']:.4f} (rel {rel:.1e}, limit "
                f"{plan.CONVERT_PPL_REL:g}); int8 weights: max |diff| {worst}, {frac:.2e} differ; smoothing/rotation "
                f"choices {'the same' if same else 'differ'}"), \
        {"ppl": ppl, "ppl_rel": rel, "int8_max_abs_diff": worst, "int8_diff_fraction": frac, "same_choices": same}


def wide_config(dry: bool) -> dict:
    from synthetic_mixtral import CONFIG
    from tiny_models import VOCAB

    c = dict(CONFIG, num_hidden_layers=1, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if dry:
        c.update(hidden_size=plan.dry_dim(4096), intermediate_size=plan.dry_dim(14336), num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16)
    return c


def build_wide(path: str, dry: bool, device: str) -> dict:
    """One Mixtral-width decoder layer (random bf16, made on ``device``: 1.45 G values) with its globals, index,
    config and the tiny tokenizer; one shard per expert, as synthetic_mixtral.py writes them."""
    import torch
    from safetensors.torch import save_file
    from tiny_models import build_tokenizer

    c = wide_config(dry)
    h, inter, hd, nh, nkv = (c["hidden_size"], c["intermediate_size"], c["head_dim"], c["num_attention_heads"],
                             c["num_key_value_heads"])
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    os.makedirs(path)
    weight_map, total = {}, 0

    def write(tag: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, os.path.join(path, f"model-{tag}.safetensors"), metadata={"format": "pt"})
        weight_map.update({n: f"model-{tag}.safetensors" for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    def ones():
        return torch.ones(h, dtype=torch.bfloat16)

    p = "model.layers.0."
    write("globals", {"model.embed_tokens.weight": rnd(c["vocab_size"], h), "lm_head.weight": rnd(c["vocab_size"], h),
                      "model.norm.weight": ones()})
    write("attn", {p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
                   p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
                   p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                   p + "block_sparse_moe.gate.weight": rnd(c["num_local_experts"], h)})
    for e in range(c["num_local_experts"]):
        x = p + f"block_sparse_moe.experts.{e}."
        write(f"e{e}", {x + "w1.weight": rnd(inter, h), x + "w3.weight": rnd(inter, h),
                        x + "w2.weight": rnd(h, inter, std=0.01)})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    build_tokenizer(path)
    return {"bytes": total, "hidden": h, "intermediate": inter}


def wide_child(argv: list[str]) -> int:
    """In the child: convert MODEL into OUT on DEVICE and print one ``WIDE {json}`` line of its measurements."""
    model, out, calib, device, mode = argv
    import resource

    import torch

    from offline.convert import ConvertOptions, convert

    t0 = time.monotonic()
    reports = convert(model, out, ConvertOptions(method="haq", calib=[calib], device=device, **plan.CONVERT_WIDE[mode]))
    wall = time.monotonic() - t0
    cuda = device.startswith("cuda")
    print("WIDE " + json.dumps({
        "wall_s": round(wall, 2), "layer_s": round(reports[0].seconds, 2), "max_rel_error": reports[0].max_rel_error,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    return 0


def convert_wide(work: str, calib: str, dry: bool, device: str) -> tuple[bool, str, dict]:
    model, out = os.path.join(work, "wide"), os.path.join(work, "wide-haq")
    t0 = time.monotonic()
    built = build_wide(model, dry, device)
    build_s = time.monotonic() - t0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "benchmarks"),
                                                       os.path.join(REPO, "tests")]))
    if dry:  # one thread, as this stage's own (main): the dry driver runs two stages at once on a small host
        env["OMP_NUM_THREADS"] = "1"
    mode = "dry" if dry else "gpu"
    cmd = [sys.executable, "-m", "gpucheck.convert_stage", WIDE_CHILD, model, out, calib, device, mode]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=plan.CONVERT_WIDE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"not converted within {plan.CONVERT_WIDE_TIMEOUT_S} s", {"build_s": round(build_s, 1)}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WIDE ")), None)
    if proc.returncode != 0 or line is None:
        return False, f"child exited {proc.returncode}: {proc.stderr.strip()[-400:]}", {}
    m = json.loads(line[5:])
    gib = 2**30
    gpu = f"{m['peak_gpu_bytes'] / gib:.2f} GiB" if m["peak_gpu_bytes"] is not None else "n/a"
    width = f"hidden {built['hidden']}, 8 experts x {built['intermediate']}"
    windows = "{samples}x{seq_len}".format(**plan.CONVERT_WIDE[mode])
    return True, (f"{'dry: reduced width, ' if dry else ''}1 layer ({width}, {built['bytes'] / gib:.2f} GiB bf16) "
                  f"--method haq --device {device}, {windows} tokens: {m['wall_s']:.1f} s (layer "
                  f"{m['layer_s']:.1f} s), peak GPU {gpu}, peak host RSS "
                  f"{m['peak_rss_bytes'] / gib:.2f} GiB"), {**m, **built, "build_s": round(build_s, 1)}


def main() -> int:
    if sys.argv[1:2] == [WIDE_CHILD]:
        return wide_child(sys.argv[2:])
    st = Stage("convert")
    names = plan.checks("convert")
    st.plan(names)
    import torch  # imported before transformers, as the converter does
    from tiny_models import build_tiny_model

    if st.dry:  # tiny shapes gain nothing from threads, and two stages share the dry host's cores: spinning OpenMP
        torch.set_num_threads(1)  # threads of two processes made each tiny conversion 20x slower

    work = os.path.join(st.out, "work", "convert")  # under --out: a killed stage leaves nothing in /tmp
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        calib = write_calibration(os.path.join(work, "calib.txt"))
        model = build_tiny_model("mixtral", os.path.join(work, "tiny-mixtral"))
        dirs: dict[str, str] = {}
        for label in plan.CONVERT_DEVICES:
            device = st.device if label == "device" else "cpu"
            out = os.path.join(work, f"tiny-{label}")

            def one(device=device, out=out, label=label):
                ok, detail, data = convert_tiny(model, calib, out, device)
                if ok:
                    dirs[label] = out
                return ok, detail + (" (dry: the CPU again)" if st.dry and label == "device" else ""), data

            st.run(f"convert/tiny-{label}", one)
        if len(dirs) == len(plan.CONVERT_DEVICES):
            st.run("convert/agree", agree, dirs, calib)
        else:
            st.result("convert/agree", "FAIL", "a tiny conversion failed")
        st.run("convert/mixtral-width", convert_wide, work, calib, st.dry, st.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
