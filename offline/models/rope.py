"""Rotary position embeddings of the reference forward: cos/sin tables for one sequence length.

The default RoPE keeps its own float64 table (the numbers every existing conversion was calibrated with).
Every scaled type (llama3, linear, dynamic, yarn, longrope, ...) is computed by transformers' own
``ROPE_INIT_FUNCTIONS`` from the checkpoint's config: the inverse frequencies and the attention scaling they
return are the model's definition, and re-implementing each formula here would drift from it as transformers
adds or fixes types. Dynamic and LongRoPE types depend on the sequence length; the table is computed for the
length of the sequence being run, as transformers does for one forward from scratch.
"""

from __future__ import annotations

import torch

from vllm_haq.errors import HAQError


class UnsupportedModelError(HAQError, ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


def rope_parameters(config: dict) -> dict:
    """The RoPE parameters of ``config`` (transformers 5's ``rope_parameters``, or the older ``rope_scaling``
    + ``rope_theta``), with ``rope_type`` filled in."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return {**scaling, **params, "rope_type": rtype}


def rope_type(config: dict, source: str = "config.json") -> str:
    """The rope type, checked: ``default`` or one of transformers' ``ROPE_INIT_FUNCTIONS`` whose tables this
    config's parameters give for every channel of a head (as Llama's attention rotates them); otherwise an error
    naming the option and what is supported."""
    params = rope_parameters(config)
    rtype = params["rope_type"]
    if rtype == "default":
        factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        if factor not in (None, 1, 1.0):
            raise UnsupportedModelError(f"{source}: partial_rotary_factor {factor!r} is not supported (only 1.0)")
        return rtype
    supported = scaled_rope_types()
    if rtype not in supported:
        raise UnsupportedModelError(f"{source}: rope type {rtype!r} (rope_parameters.rope_type) is not supported; "
                                    f"supported: {['default'] + supported}")
    try:
        hd = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except KeyError as exc:
        raise UnsupportedModelError(f"{source}: rope type {rtype!r} needs {exc} in the config") from exc
    _checked_inv_freq(config, rtype, 1, hd, source)
    return rtype


def scaled_rope_types() -> list[str]:
    """The scaled rope types the installed transformers computes."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return sorted(ROPE_INIT_FUNCTIONS)


def rope_theta(config: dict) -> float:
    return float(rope_parameters(config).get("rope_theta") or config.get("rope_theta") or 10000.0)


def rope_cos_sin(config: dict, t: int, hd: int, device: torch.device | str = "cpu",
                 cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [t, hd] (float32 on ``device``) of the checkpoint's RoPE for positions 0..t-1. ``cache``: a dict
    kept by the caller, so the transformers config is built once per model and length. The type was checked by
    :func:`rope_type` when the spec was made."""
    rtype = rope_parameters(config)["rope_type"]
    if rtype == "default":
        return default_cos_sin(t, hd, rope_theta(config), device)
    key = (rtype, t, hd)
    if cache is None or key not in cache:
        inv, scale = _checked_inv_freq(config, rtype, t, hd)
        freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv.double())
        emb = torch.cat((freqs, freqs), dim=-1)
        value = ((emb.cos() * scale).float(), (emb.sin() * scale).float())
        if cache is None:
            return value[0].to(device), value[1].to(device)
        cache[key] = value
    cos, sin = cache[key]
    return cos.to(device), sin.to(device)


def _checked_inv_freq(config: dict, rtype: str, t: int, hd: int,
                      source: str = "config.json") -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention scaling) from transformers' ``ROPE_INIT_FUNCTIONS[rtype]``, given a
    transformers config built from ``config`` (transformers standardizes old and new rope keys itself); one
    frequency per pair of a head's channels, or an error (a partial rotary factor rotates only some)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
        inv, scale = ROPE_INIT_FUNCTIONS[rtype](hf_config, "cpu", seq_len=t)
    except (KeyError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"{source}: rope type {rtype!r}: its rope_parameters are incomplete or "
                                    f"invalid for transformers ({exc!r})") from exc
    if inv.numel() * 2 != hd:
        raise UnsupportedModelError(f"{source}: rope type {rtype!r} gives {inv.numel() * 2} rotary channels for "
                                    f"head_dim {hd} (partial_rotary_factor is not supported)")
    return inv.float().cpu(), float(scale)


def default_cos_sin(t: int, hd: int, theta: float,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Computed on the CPU in float64 whatever ``device`` is, so every device rotates by the same float32 values."""
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
