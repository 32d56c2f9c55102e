"""Offloading settings: ``additional_config={"haq": {...}}`` with environment variables as fallback.

Exactly one budget key may be given (none means every expert stays on the device):

* ``slots_per_layer`` (int ≥ 0): device cache slots in every MoE layer;
* ``expert_fraction`` (0–1): fraction of all experts the device holds, split across
  layers by expected hit-rate gain;
* ``expert_gib`` (≥ 0): device memory for expert weights and scales, in GiB.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from vllm_haq.errors import HAQError
from vllm_haq.offload.policy import POLICY_NAMES as POLICIES  # one list of policies

BUDGET_KEYS = ("slots_per_layer", "expert_fraction", "expert_gib")

# additional_config key -> environment variable used when the key is absent
ENV_VARS = {
    "slots_per_layer": "HAQ_SLOTS_PER_LAYER",
    "expert_fraction": "HAQ_EXPERT_FRACTION",
    "expert_gib": "HAQ_EXPERT_GIB",
    "policy": "HAQ_OFFLOAD_POLICY",
    "cpu_threads": "HAQ_CPU_THREADS",
    "prefetch": "HAQ_PREFETCH",
    "stats_file": "HAQ_STATS_FILE",
    "stats_interval_s": "HAQ_STATS_INTERVAL_S",
}


class OffloadConfigError(HAQError, ValueError):
    """An offloading setting that cannot be honoured; the message names the key."""


@dataclass(frozen=True)
class OffloadConfig:
    """Expert budget, serving policy and engine knobs (see the module docstring for budgets)."""

    slots_per_layer: int | None = None
    expert_fraction: float | None = None
    expert_gib: float | None = None
    policy: str = "haq"  # haq: cost-model planner + prefetch; lru: fetch every miss (Mixtral-offloading);
    #                      static: fixed hottest experts, misses on CPU (Fiddler)
    cpu_threads: int | None = None  # CPU experts' threads (serving.cpu_worker_plan); None: sized to the host
    prefetch: str = "auto"  # haq policy: fetch layer l+1's likely experts once layer l has routed --
    #                        auto: those whose expected saving beats the calibrated hand-off cost; always; off
    stats_file: str | None = None  # JSON statistics written every stats_interval_s
    stats_interval_s: float = 30.0

    @property
    def offloading(self) -> bool:
        """True when a budget is set (it may still cover every expert; the engine decides)."""
        return any(getattr(self, k) is not None for k in BUDGET_KEYS)

    def slots_for(self, num_layers: int, num_experts: int, expert_bytes: int) -> int | None:
        """Total cache slots over all layers for this budget, or None for "all experts"."""
        total = num_layers * num_experts
        if self.slots_per_layer is not None:
            self.check_slots(num_experts)
            slots = self.slots_per_layer * num_layers
        elif self.expert_fraction is not None:
            slots = int(self.expert_fraction * total + 1e-9)
        elif self.expert_gib is not None:
            slots = min(total, int(self.expert_gib * 2**30 // expert_bytes))
        else:
            return None
        return None if slots >= total else slots

    def check_slots(self, num_experts: int, where: str = "") -> None:
        """Refuse a ``slots_per_layer`` above the experts a layer has (``where``: the layer, if known)."""
        if self.slots_per_layer is not None and self.slots_per_layer > num_experts:
            raise OffloadConfigError(f"haq.slots_per_layer={self.slots_per_layer} exceeds the model's "
                                     f"{num_experts} experts per layer" + (f" ({where})" if where else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_value(key: str, value: Any, source: str):
    where = f"{source} haq.{key}"
    try:
        if key == "slots_per_layer" or key == "cpu_threads":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            v = int(value)
            if v < (1 if key == "cpu_threads" else 0):
                raise ValueError
            return v
        if key in ("expert_fraction", "expert_gib", "stats_interval_s"):
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not v >= 0 or (key == "expert_fraction" and v > 1) or (key == "stats_interval_s" and v <= 0):
                raise ValueError
            return v
        if key == "prefetch":
            v = str(value).lower()
            if value is True or v in ("auto", "1", "true", "yes", "on"):
                return "auto"
            if value is False or v in ("off", "0", "false", "no"):
                return "off"
            if v == "always":
                return "always"
            raise ValueError
        if key == "policy":
            if value not in POLICIES:
                raise ValueError
            return value
        if key == "stats_file":
            return str(value)
    except (TypeError, ValueError):
        pass
    expected = {
        "slots_per_layer": "an integer >= 0", "cpu_threads": "an integer >= 1",
        "expert_fraction": "a number in [0, 1]", "expert_gib": "a number >= 0",
        "stats_interval_s": "a number > 0", "prefetch": "auto, always or off (true = auto, false = off)",
        "policy": f"one of {list(POLICIES)}",
        "stats_file": "a path",
    }[key]
    raise OffloadConfigError(f"{where}={value!r} is invalid: expected {expected}")


def parse_offload_config(additional_config: dict | None, environ: dict | None = None) -> OffloadConfig:
    """Settings from vLLM's ``additional_config["haq"]``, then ``HAQ_*`` environment variables."""
    environ = os.environ if environ is None else environ
    section = (additional_config or {}).get("haq") or {}
    if not isinstance(section, dict):
        raise OffloadConfigError(f"additional_config['haq'] must be a JSON object, got {section!r}")
    unknown = sorted(set(section) - set(ENV_VARS))
    if unknown:
        raise OffloadConfigError(f"additional_config['haq'] has unknown keys {unknown}; known: {sorted(ENV_VARS)}")
    values: dict[str, Any] = {}
    for key, env in ENV_VARS.items():
        if key in section and section[key] is not None:
            values[key] = _parse_value(key, section[key], "additional_config")
        elif environ.get(env, "") != "":
            values[key] = _parse_value(key, environ[env], f"environment {env}:")
    # additional_config wins over the environment for the budget as a whole
    given = [k for k in BUDGET_KEYS if k in section and section[k] is not None]
    if given:
        values = {k: v for k, v in values.items() if k not in BUDGET_KEYS or k in given}
    budgets = [k for k in BUDGET_KEYS if k in values]
    if len(budgets) > 1:
        raise OffloadConfigError(f"haq budget given more than once ({budgets}); set exactly one of {list(BUDGET_KEYS)}")
    return OffloadConfig(**values)
