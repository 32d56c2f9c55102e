"""The calibrated methods and the constants of their search, in one place so that the converter, the search and
the size estimate (``offline.estimate``) read the same values."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_haq.quant.gptq import GPTQConfig


@dataclass(frozen=True)
class Method:
    """What a ``--method`` does: smooth at all, search α per group (else one fixed α), round with GPTQ."""

    smooth: bool
    search_alpha: bool
    gptq: bool


METHODS = {
    "rtn": Method(smooth=False, search_alpha=False, gptq=False),
    "gptq": Method(smooth=False, search_alpha=False, gptq=True),
    "smoothquant": Method(smooth=True, search_alpha=False, gptq=False),
    "haq": Method(smooth=True, search_alpha=True, gptq=True),
}
# Up to 0.95: with 0.8 as the end most of SmolLM2's groups chose 0.8; ending at 1.0 did worse on the validation splits.
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SEARCH_ROWS = 1024  # calibration rows kept per observed input for the α search
SEARCH_ROW_STRIDE = 4  # of which every SEARCH_ROW_STRIDE-th observed row is kept
GPTQ_SHORTLIST = 2  # α values (best by the round-to-nearest score) scored again with GPTQ, besides no smoothing
MIN_EXPERT_TOKENS = 16
# α values (None: no smoothing) offered together with rotation. SmolLM2's conversion rotated every group and
# chose α 0.6–0.8 for the norm outputs, none or 0.5–0.7 for o_proj's and down_proj's inputs.
ROTATION_ALPHAS = (None, 0.3, 0.5, 0.6, 0.7, 0.8)
# --rotation: "search" offers rotated candidates to haq's search, "all" offers only those (every group
# that can be rotated is), "none" offers none.
ROTATION_MODES = ("search", "all", "none")
MOE_SMOOTHING = ("shared", "per-expert")


@dataclass(frozen=True)
class LayerOptions:
    """How every calibrated layer of one conversion is smoothed and rounded (the layer-independent part of
    ``haq convert``'s options), handed down as one value instead of a parameter per knob.

    ``alpha`` is the fixed α of methods that do not search it; ``moe_smoothing`` one of MOE_SMOOTHING,
    ``rotation`` one of ROTATION_MODES; ``chunk`` calibration samples per forward chunk (bounds attention memory).
    """

    method: Method
    alpha: float = 0.5
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    moe_smoothing: str = "shared"
    chunk: int = 8
    rotation: str = "none"

    @property
    def gptq_search(self) -> GPTQConfig | None:
        """The GPTQ settings the search re-scores its shortlist with: only where the layer is then GPTQ-rounded."""
        return self.gptq if self.method.gptq else None
