"""Greedy generation from a converted HAQ checkpoint without vLLM, on any torch device.

Why: ``haq eval --backend hf`` scores text with the pure-PyTorch forward of :mod:`offline.models`, and vLLM is
the only way to *generate* with the runtime's MoE path. This module runs that same reference forward, but
serves its routed experts the way the vLLM plugin does: all resident (on the CPU one call of the CPU kernel,
:func:`vllm_haq.kernels.cpu_moe_forward`; elsewhere :func:`vllm_haq.kernels.int8_moe_forward`), or from host
memory through
:class:`vllm_haq.offload.OffloadEngine` with the plugin's offloading keys. So a converted checkpoint can be
generated from (and the offload engine exercised end to end) on a GPU host that has no vLLM, and the tests can
compare every budget and policy with the all-resident run on the CPU.

What runs where: routers, attention, norms, shared experts and dense linears keep the reference arithmetic
(:func:`vllm_haq.quant.w8a8_linear_reference` via :class:`offline.models.LayerTensors`); only the routed
experts change path, with the plugin's conventions (``w13`` = [gate; up] fused, per-expert ``input_smooth``,
one gate/up input rotation applied before the experts, one down-projection rotation for all experts).

No KV cache: every step recomputes the whole sequence. It is a reference path, and recomputing keeps it exactly
the forward ``haq eval --backend hf`` runs; the cost grows quadratically with the length, and each step's MoE
calls (and so the offload statistics) see every token so far, not one new token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from offline.models import LayerTensors, ModelSpec, global_tensor_names, layer_rotations, spec_for
from offline.source import SafetensorsCheckpoint
from vllm_haq.format import COMPRESSED_TENSORS, CONFIG_FILE, CheckpointError, read_config, validate_checkpoint, \
    validate_routing_stats
from vllm_haq.kernels import cpu_fused_ok, cpu_moe_forward, int8_moe_forward
from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadEngine, parse_offload_config
from vllm_haq.quant import rotate


@dataclass
class GenerationResult:
    """What :func:`generate` produced."""

    tokens: list[int]  # the new tokens (greedy), without the prompt
    logits: torch.Tensor  # float32 [len(tokens), vocab] on the CPU: the distribution each token was chosen from
    offload_stats: dict | None  # OffloadEngine.stats() when an expert budget was set, else None


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA if available), ``cpu`` or ``cuda[:N]``; a clear error for anything this host cannot run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device (expected auto, cpu or cuda[:N])") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only auto, cpu and cuda[:N] are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested, but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested, but this host has {torch.cuda.device_count()} CUDA "
                             "device(s)")
        if dev.index is None:  # the engine's copy stream and pinned memory want a definite device
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def offload_config(offload: dict | None) -> OffloadConfig:
    """The plugin's ``additional_config["haq"]`` keys (given as that dict, or wrapped as ``{"haq": {...}}``) as an
    OffloadConfig. ``HAQ_*`` environment variables are not read: the caller's dict is the whole setting."""
    section = offload or {}
    if set(section) == {"haq"} and isinstance(section["haq"], dict):
        section = section["haq"]
    return parse_offload_config({"haq": section}, environ={})


def checkpoint_config(model_dir: str) -> dict:
    """``config.json`` of a HAQ checkpoint; CheckpointError naming the file if ``model_dir`` is not one."""
    config = read_config(model_dir)
    qc = config.get("quantization_config")
    path = os.path.join(model_dir, CONFIG_FILE)
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: no quantization_config: not a converted checkpoint (haq convert MODEL OUT)")
    if qc.get("quant_method") == COMPRESSED_TENSORS:
        raise CheckpointError(f"{path}: a compressed-tensors checkpoint; haq import it first (haq import CT_DIR OUT)")
    return config


def expert_tensors(lt: LayerTensors, block: str, names: tuple[str, str, str], num_experts: int,
                   where: str) -> tuple[ExpertTensors, int | None]:
    """One MoE layer's experts stacked as the runtime holds them (host tensors), and their gate/up input rotation.

    Same layout as the vLLM plugin's parameters: ``w13`` = [gate; up] rows, scales [N, rows, 1], one smoothing
    vector per expert when the checkpoint has explicit ``input_smooth`` (gate and up read one input, so they share
    it), one rotation block for all experts' gate/up input and one for their down projections."""
    gate, up, down = names
    w13, s13, w2, s2, smooth, rot13, rot2 = [], [], [], [], [], set(), set()
    for e in range(num_experts):
        p = f"{block}.experts.{e}."
        for n in names:
            w = lt.get(f"{p}{n}.weight")
            if w is None or w.dtype != torch.int8 or lt.get(f"{p}{n}.weight_scale") is None:
                raise CheckpointError(f"{where}{p}{n}: expected an int8 weight with weight_scale (the int8 MoE path "
                                      f"serves quantized experts only), found {None if w is None else w.dtype}")
        if lt.get(f"{p}{down}.input_smooth") is not None:
            raise CheckpointError(f"{where}{p}{down}.input_smooth: the MoE runtime has no down-projection smoothing")
        sg, su = lt.get(f"{p}{gate}.input_smooth"), lt.get(f"{p}{up}.input_smooth")
        if (sg is None) != (su is None) or (sg is not None and not torch.equal(sg, su)):
            raise CheckpointError(f"{where}{p}{gate}/{up}: input_smooth differs; they read one input, so they must "
                                  "share one smoothing vector")
        smooth.append(sg)
        w13.append(torch.cat([lt[f"{p}{gate}.weight"], lt[f"{p}{up}.weight"]]))
        s13.append(torch.cat([lt[f"{p}{gate}.weight_scale"], lt[f"{p}{up}.weight_scale"]]).float().reshape(-1, 1))
        w2.append(lt[f"{p}{down}.weight"])
        s2.append(lt[f"{p}{down}.weight_scale"].float().reshape(-1, 1))
        rot13 |= {lt.rotations.get(p + gate), lt.rotations.get(p + up)}
        rot2.add(lt.rotations.get(p + down))
    if len({s is None for s in smooth}) > 1:
        raise CheckpointError(f"{where}{block}: only some experts have input_smooth")
    if len(rot13) > 1 or len(rot2) > 1 or (None not in rot13 and smooth[0] is not None):
        raise CheckpointError(f"{where}{block}: quantization_config.input_rotation gives the experts gate/up blocks "
                              f"{sorted(map(str, rot13))} and down blocks {sorted(map(str, rot2))}; the MoE runtime "
                              "needs one block (or none) for all experts, and no gate/up rotation with input_smooth")
    stacked = ExpertTensors(torch.stack(w13), torch.stack(s13), torch.stack(w2), torch.stack(s2),
                            None if smooth[0] is None else torch.stack(smooth).float(), down_rotation=rot2.pop())
    return stacked, rot13.pop()


class _MoELayer:
    """A layer's routed experts on the runtime's path: the offload engine, or resident per-expert GEMMs."""

    def __init__(self, index: int, experts: ExpertTensors, rotation: int | None, device: torch.device,
                 engine: OffloadEngine | None):
        self.index, self.rotation, self.engine = index, rotation, engine
        if engine is not None:
            engine.add_layer(index, experts)  # host memory; the engine owns the device cache
            return
        resident = ExpertTensors(*(None if t is None else t.to(device) for t in
                                   (experts.w13, experts.w13_scale, experts.w2, experts.w2_scale, experts.smooth)),
                                 down_rotation=experts.down_rotation)
        # on the CPU, the plugin's resident MoE path (one kernel call per step), as the engine's host experts
        self.stack = resident if cpu_fused_ok(resident.w13) else None
        self.w13, self.w2 = zip(*(resident.gemms(e, torch.float32) for e in range(resident.count)))

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:  # every expert's gate/up reads the same rotated input (the router did not)
            x = rotate(x.float(), self.rotation)
        if self.engine is not None:
            return self.engine.forward(self.index, x, weights, ids)
        if self.stack is not None:
            return cpu_moe_forward(x, weights, ids, self.stack)
        return int8_moe_forward(x, weights, ids, self.w13, self.w2)


class _ServedSpec(ModelSpec):
    """The reference forward of ``spec`` with its routed experts served by :class:`_MoELayer`."""

    def __init__(self, spec: ModelSpec, moe: dict[int, _MoELayer]):
        super().__init__(spec.family, spec.config)
        self.moe = moe

    def moe_experts(self, i, lt, x2, block, names, weights, ids):
        return self.moe[i](x2, weights, ids).to(x2.dtype)


def _load(model_dir: str, device: torch.device, cfg: OffloadConfig):
    """(served spec, global tensors, per-layer tensors, engine or None), all but host experts on ``device``."""
    config = checkpoint_config(model_dir)
    qcfg = validate_checkpoint(model_dir)
    spec = spec_for(config, os.path.join(model_dir, CONFIG_FILE))
    src = SafetensorsCheckpoint(model_dir)
    engine = None
    moe_layers = [i for i in range(spec.num_layers) if spec.moe_block(i) is not None]
    if cfg.offloading:
        if not moe_layers:
            raise ValueError(f"{model_dir}: an expert budget was given, but the model has no MoE layers")
        cfg.check_slots(spec.num_experts, model_dir)
        routing = None
        if qcfg.routing_statistics:
            routing = validate_routing_stats(os.path.join(model_dir, qcfg.routing_statistics), config)
        engine = OffloadEngine(cfg, device, torch.float32, routing=routing, name=model_dir)
    try:
        g = {n: src.get(n).to(device) for n in global_tensor_names(spec, src.names())}
        layers, moe = _load_layers(model_dir, config, spec, src, moe_layers, device, engine)
    except BaseException:
        if engine is not None:  # unlock the host experts already registered
            engine.close()
        raise
    return _ServedSpec(spec, moe), g, layers, engine


def _load_layers(model_dir: str, config: dict, spec: ModelSpec, src: SafetensorsCheckpoint, moe_layers: list[int],
                 device: torch.device, engine: OffloadEngine | None) -> tuple[list[LayerTensors], dict[int, _MoELayer]]:
    """Every decoder layer's tensors on ``device``; each MoE layer's routed experts moved into a :class:`_MoELayer`."""
    layers, moe = [], {}
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        lt = LayerTensors(src.load_prefix(prefix), rotations=layer_rotations(config, prefix))
        if i in moe_layers:
            block, names = spec.moe_block(i)
            experts, rotation = expert_tensors(lt, block, names, spec.num_experts, os.path.join(model_dir, prefix))
            moe[i] = _MoELayer(i, experts, rotation, device, engine)
            lt.t = {n: t for n, t in lt.t.items() if not n.startswith(f"{block}.experts.")}
        lt.t = {n: t.to(device) for n, t in lt.t.items()}
        layers.append(lt)
    return layers, moe


def generate(model_dir: str, prompt_ids: list[int], max_new_tokens: int, device: str = "cpu",
             offload: dict | None = None) -> GenerationResult:
    """Greedy generation of ``max_new_tokens`` tokens after ``prompt_ids`` from the HAQ checkpoint ``model_dir``.

    ``device``: ``cpu``, ``cuda[:N]`` or ``auto``; the whole model is loaded onto it, except the experts of an
    offloaded model, which stay in host memory. ``offload``: the vLLM plugin's ``additional_config["haq"]`` keys
    (``slots_per_layer``, ``expert_fraction``, ``expert_gib``, ``policy``, ...); None or no budget key keeps every
    expert resident. Full recompute per step (see the module docstring). The engine, if any, is closed on return
    (its ``stats_file``, if set, written)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: greedy generation needs at least one prompt token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    cfg = offload_config(offload)
    dev = resolve_device(device)
    spec, g, layers, engine = _load(model_dir, dev, cfg)
    tokens, logits = [], []
    try:
        vocab = g[spec.facts.embed].shape[0]
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt_ids must lie in [0, {vocab}) (the model's vocabulary), got {min(prompt_ids)}.."
                             f"{max(prompt_ids)}")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                h = spec.embed(g, ids)
                for i, lt in enumerate(layers):
                    h = spec.layer_forward(i, lt, h)
                last = spec.head(g, h[:, -1:])[0, -1].float()
                tok = int(last.argmax())
                tokens.append(tok)
                logits.append(last.cpu())
                ids = torch.cat([ids, torch.tensor([[tok]], device=dev)], dim=1)
        stats = engine.stats() if engine is not None else None
    finally:
        if engine is not None:
            engine.close()
    out = torch.stack(logits) if logits else torch.zeros(0, vocab, dtype=torch.float32)
    return GenerationResult(tokens, out, stats)
