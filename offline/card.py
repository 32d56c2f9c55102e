"""The converted checkpoint's model card: the source's licence and README files, plus a quantization section.

A quantized model is the source model under the source's licence, and people find out how it was made
from its README (the Hugging Face model card). So ``haq convert`` carries every ``LICENSE*`` / ``LICENCE*`` /
``NOTICE*`` / ``COPYING*`` / ``USE_POLICY*`` / ``README*`` file of the source over as it is, and appends a
"## Quantization (vllm-haq)" section to ``README.md`` — or writes a ``README.md`` holding that section when the
source has none. The section is made from the plan alone (options, model facts, source), not from the
per-layer results, so that ``--dry-run`` sizes it exactly and a rerun writes the same bytes; the per-layer
choices are in ``config.json``'s ``quantization_config``.
"""

from __future__ import annotations

import os
import shutil

from vllm_haq import __version__
from vllm_haq.format import ROUTING_FILE

from offline.haq import METHODS as METHOD_SPECS

CARD_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "COPYING", "USE_POLICY", "README")
README = "README.md"
SECTION = "## Quantization (vllm-haq)"
_METHOD_TEXT = {
    "rtn": "`rtn`: round to nearest",
    "gptq": "`gptq`: Hessian-aware rounding (GPTQ) on calibration activations",
    "smoothquant": "`smoothquant`: SmoothQuant smoothing with a fixed α, then round to nearest",
    "haq": "`haq` (Hessian-aware quantization): smoothing strength α searched per layer and input on the "
           "calibration activations, optional block-Hadamard input rotation, then GPTQ on the smoothed Hessians",
}


def carried_files(model_dir: str) -> list[str]:
    """The source's licence and README files (name prefixes in ``CARD_PREFIXES``, any case), sorted."""
    return sorted(f for f in os.listdir(model_dir) if f.upper().startswith(CARD_PREFIXES)
                  and os.path.isfile(os.path.join(model_dir, f)))


def readme_text(plan) -> str:
    """The output's README.md: the source's with the quantization section appended, else a new one."""
    source = os.path.join(plan.model_dir, README)
    if os.path.isfile(source):
        with open(source, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return text.rstrip("\n") + "\n\n" + quantization_section(plan)
    hub = plan.hub_source
    name = hub["repo_id"] if hub else os.path.basename(plan.model_dir.rstrip("/"))
    front = ["---", *([f"base_model: {hub['repo_id']}"] if hub else []),
             "tags:", "- vllm-haq", "- int8", "- w8a8", "---", ""]
    return "\n".join(front) + f"# {name} (W8A8 int8, vllm-haq)\n\n" + quantization_section(plan)


def quantization_section(plan) -> str:
    """How the checkpoint was made and how to serve it (Markdown, ends with a newline)."""
    opts, spec = plan.opts, METHOD_SPECS[plan.opts.method]
    hub = plan.hub_source
    source = (f"`{hub['repo_id']}` (revision `{hub['revision']}`, commit `{hub['commit']}`)" if hub
              else f"the model in `{os.path.basename(plan.model_dir.rstrip('/'))}`")
    lines = [SECTION, "",
             f"This checkpoint is {source} quantized by `haq convert` of vllm-haq {__version__}.", "",
             "- Scheme: W8A8 int8: int8 weights, symmetric, one float32 scale per output channel; int8 activations "
             "with dynamic per-token scales computed at run time",
             f"- Method: {_METHOD_TEXT.get(opts.method, opts.method)}",
             f"- Smoothing: {_smoothing(plan, spec)}",
             f"- Input rotation: `{opts.rotation_mode}`" + (" (format v2)" if opts.rotation_mode != "none" else "")]
    if spec.gptq:
        order = "activation order" if opts.act_order else "column order"
        lines.append(f"- GPTQ: block size {opts.gptq_block_size}, dampening {opts.gptq_dampening}, {order}")
    lines += [f"- Calibration: {_calibration(plan)}",
              f"- Kept unquantized: {', '.join(f'`{p}`' for p in plan.ignore) or 'nothing'}"]
    if plan.routing_stats:
        lines.append(f"- Routing statistics: `{ROUTING_FILE}` (expert routing counts on the calibration text; they "
                     "seed vllm-haq's expert offloading)")
    lines += ["- Every setting and the per-layer choices: `quantization_config` in `config.json`", "",
              "### Serving with vLLM", "",
              "With the vllm-haq plugin installed (`pip install vllm-haq`), pass `--quantization haq`:", "",
              "```bash", "vllm serve PATH_OR_ID --quantization haq   # or: haq serve PATH_OR_ID", "```", "",
              "```python", "from vllm import LLM", "", 'llm = LLM("PATH_OR_ID", quantization="haq")', "```", ""]
    return "\n".join(lines)


def _smoothing(plan, spec) -> str:
    opts = plan.opts
    if not spec.smooth:
        return "none"
    text = ("α searched per layer and input (or none)" if spec.search_alpha else f"fixed α = {opts.alpha}")
    if plan.moe_layers:
        text += (f"; MoE experts `{opts.moe_smoothing}`: " +
                 ("one vector folded into the norm shared with the router" if opts.moe_smoothing == "shared"
                  else "one explicit `input_smooth` per expert, applied at run time"))
    return text


def _calibration(plan) -> str:
    opts = plan.opts
    if not plan.needs_calibration:
        return "none (round to nearest needs no calibration text)"
    sources = ", ".join(f"`{c}`" for c in plan.corpus())
    return f"{sources}; {opts.samples} windows of {opts.seq_len} tokens, seed {opts.seed}"


def card_bytes(plan) -> int:
    """Bytes of the files ``write_card_files`` writes (for ``--dry-run``)."""
    copied = [f for f in carried_files(plan.model_dir) if f != README]
    return (sum(os.path.getsize(os.path.join(plan.model_dir, f)) for f in copied)
            + len(readme_text(plan).encode("utf-8")))


def write_card_files(plan, out_dir: str) -> list[str]:
    """Copy the source's licence and README files into ``out_dir`` and write README.md; returns the names."""
    names = carried_files(plan.model_dir)
    for fname in names:
        if fname != README:
            shutil.copy2(os.path.join(plan.model_dir, fname), os.path.join(out_dir, fname))
    with open(os.path.join(out_dir, README), "w", encoding="utf-8") as f:
        f.write(readme_text(plan))
    return sorted(set(names) | {README})
