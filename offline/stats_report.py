"""``haq stats``: expert routing statistics as a text table and PNG heatmaps.

Two sources, one report:

* a HAQ checkpoint's ``haq_routing.safetensors`` (counts of the calibration tokens, written by
  ``haq convert``), loaded and checked against the model by :func:`vllm_haq.format.validate_routing_stats`;
* ``--live FILE``: the ``stats_file`` JSON a serving engine with expert offloading writes
  (``additional_config={"haq": {"stats_file": ...}}`` or ``HAQ_STATS_FILE``); its ``"routing"`` key holds
  the exact counts of the steps it served, in the checkpoint's schema (``vllm_haq/offload/routing_stats.py``).

Written to the output directory:

* ``usage.txt``: per MoE layer: tokens, routes, the top experts and their share of the routes, the
  entropy of the route distribution and how many experts cover 90% of the routes (also printed);
* ``usage.png``: heatmap layers x experts, colour = fraction of the layer's tokens routed to the expert;
* ``transitions.png``: every consecutive MoE-layer pair in one grid, colour = P(a token routed to expert a
  at layer l has its next-layer route at expert b) (rows sum to 1);
* ``transitions/layer_<l>_to_<l+1>.png``: the same, one larger labelled figure per pair.

No vLLM imports (``offline/`` never imports vLLM); matplotlib renders with the Agg backend.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from vllm_haq.errors import HAQError
from vllm_haq.format import (
    CONFIG_FILE,
    QUANT_METHOD,
    ROUTING_FILE,
    ROUTING_METADATA_KEY,
    moe_layout,
    parse_quantization_config,
    read_config,
    validate_routing_stats,
)

LIVE_ROUTING_KEY = "routing"  # key of the engine's stats_file JSON (vllm_haq.offload.routing_stats.LIVE_ROUTING_KEY)
USAGE_TXT = "usage.txt"
USAGE_PNG = "usage.png"
TRANSITIONS_PNG = "transitions.png"
TRANSITIONS_DIR = "transitions"


class StatsError(HAQError, ValueError):
    """Routing statistics that cannot be read or rendered; the message names the file and the problem."""


@dataclass
class RoutingData:
    """Routing counts of one source: ``expert_counts`` int64 [L, E], ``transition_counts`` int64 [L-1, E, E]."""

    source: str  # the file the counts came from
    description: str  # e.g. "calibration: wiki.train.txt" or "served steps"
    layer_indices: list[int]
    expert_counts: torch.Tensor
    transition_counts: torch.Tensor
    tokens: list[int]  # tokens routed at each MoE layer
    top_k: int | None = None  # experts per token, when known

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    @property
    def num_experts(self) -> int:
        return int(self.expert_counts.shape[1])


@dataclass
class LayerUsage:
    """One row of the usage table."""

    layer: int
    tokens: int
    routes: int
    top: list[tuple[int, float]] = field(default_factory=list)  # (expert, share of the layer's routes)
    entropy_bits: float = float("nan")  # of the route shares; log2(E) when uniform
    experts_for_coverage: int = 0  # fewest experts whose routes add up to the coverage fraction


# --------------------------------------------------------------------------- loading


def load_checkpoint_routing(model_dir: str) -> RoutingData:
    """The calibration routing counts a HAQ checkpoint carries (validated against its config.json)."""
    if not os.path.exists(model_dir):
        raise StatsError(f"{model_dir}: no such directory")
    if not os.path.isdir(model_dir):
        raise StatsError(f"{model_dir}: not a directory (give the checkpoint directory)")
    config = read_config(model_dir)
    cfg_path = os.path.join(model_dir, CONFIG_FILE)
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        name = parse_quantization_config(qc, f"{cfg_path}: quantization_config").routing_statistics
        if not name:
            if moe_layout(config) is None:
                raise StatsError(f"{cfg_path}: a dense model carries no routing statistics (they exist for MoE "
                                 "models only)")
            raise StatsError(f"{cfg_path}: the checkpoint carries no routing statistics "
                             "(quantization_config.routing_statistics is null: converted with --no-routing-stats?)")
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise StatsError(f"{path}: routing statistics named in config.json are missing")
    else:
        path = os.path.join(model_dir, ROUTING_FILE)
        if not os.path.exists(path):
            raise StatsError(f"{model_dir}: carries no routing statistics (no {ROUTING_FILE}, and {cfg_path} "
                             "has no HAQ quantization_config)")
    stats = validate_routing_stats(path, config)  # the format's own loader and checks
    info = _routing_metadata(path)
    counts, trans = stats["expert_counts"], stats["transition_counts"]
    top_k = config.get("num_experts_per_tok")
    top_k = int(top_k) if top_k else None
    if isinstance(info.get("tokens"), int):
        tokens = [int(info["tokens"])] * counts.shape[0]
    elif top_k:
        tokens = [int(n) // top_k for n in counts.sum(1).tolist()]
    else:
        raise StatsError(f"{path}: metadata {ROUTING_METADATA_KEY!r} gives no token count, and {cfg_path} "
                         "has no num_experts_per_tok to derive it from")
    corpus = info.get("corpus") or []
    description = "calibration" + (": " + ", ".join(str(c) for c in corpus) if corpus else "")
    return RoutingData(path, description, stats["layer_indices"].tolist(), counts, trans, tokens, top_k)


def _routing_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(ROUTING_METADATA_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise StatsError(f"{path}: metadata {ROUTING_METADATA_KEY!r} is not JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise StatsError(f"{path}: metadata {ROUTING_METADATA_KEY!r} is not a JSON object")
    return info


def load_live_routing(path: str) -> RoutingData:
    """The served routing counts in a serving engine's ``stats_file`` JSON."""
    if not os.path.exists(path):
        raise StatsError(f"{path}: no such file (the engine writes it when additional_config haq.stats_file "
                         "or HAQ_STATS_FILE is set and an expert budget is configured)")
    if os.path.isdir(path):
        raise StatsError(f"{path}: is a directory; --live takes the engine's stats_file JSON")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StatsError(f"{path}: not a JSON file ({exc})") from exc
    if not isinstance(data, dict) or LIVE_ROUTING_KEY not in data:
        raise StatsError(f"{path}: no {LIVE_ROUTING_KEY!r} counts in it (not an offload engine's stats_file, or "
                         "one written by a vllm-haq older than haq stats --live)")
    r = data[LIVE_ROUTING_KEY]
    if not isinstance(r, dict):
        raise StatsError(f"{path}: {LIVE_ROUTING_KEY!r} is not a JSON object")

    def tensor(key: str, dims: int) -> torch.Tensor:
        if key not in r:
            raise StatsError(f"{path}: {LIVE_ROUTING_KEY}.{key} is missing")
        try:
            t = torch.tensor(r[key], dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise StatsError(
                f"{path}: {LIVE_ROUTING_KEY}.{key} is not a rectangular array of integers ({exc})") from exc
        if t.dim() != dims and not (t.numel() == 0 and dims > 1):
            raise StatsError(f"{path}: {LIVE_ROUTING_KEY}.{key} has {t.dim()} dimensions, expected {dims}")
        if bool((t < 0).any()):
            raise StatsError(f"{path}: {LIVE_ROUTING_KEY}.{key} has negative counts")
        return t

    layers, tokens, counts = tensor("layer_indices", 1), tensor("tokens", 1), tensor("expert_counts", 2)
    trans = tensor("transition_counts", 3)
    n, e = counts.shape
    if n == 0 or e == 0:
        raise StatsError(f"{path}: {LIVE_ROUTING_KEY}.expert_counts is empty")
    if trans.numel() == 0:
        trans = torch.zeros(n - 1, e, e, dtype=torch.int64)
    for key, t, shape in (("layer_indices", layers, (n,)), ("tokens", tokens, (n,)),
                          ("transition_counts", trans, (n - 1, e, e))):
        if tuple(t.shape) != shape:
            raise StatsError(f"{path}: {LIVE_ROUTING_KEY}.{key} has shape {list(t.shape)}, but expert_counts "
                             f"{[n, e]} means {list(shape)}")
    if int(tokens.sum()) == 0:
        raise StatsError(f"{path}: the engine has not served a step yet (0 tokens routed); read it again later")
    routes, toks = int(counts.sum()), int(tokens.sum())
    top_k = routes // toks if toks and routes % toks == 0 else None
    desc = "served steps" + (f" of {data['model']}" if isinstance(data.get("model"), str) else "")
    return RoutingData(path, desc, layers.tolist(), counts, trans, tokens.tolist(), top_k)


# --------------------------------------------------------------------------- numbers


def layer_usage(data: RoutingData, top: int = 3, coverage: float = 0.9) -> list[LayerUsage]:
    """Per MoE layer: tokens, routes, top experts by share of routes, entropy, experts covering ``coverage``."""
    rows = []
    for pos, layer in enumerate(data.layer_indices):
        c = data.expert_counts[pos].double()
        routes = int(data.expert_counts[pos].sum())
        row = LayerUsage(layer=layer, tokens=int(data.tokens[pos]), routes=routes)
        if routes > 0:
            share = c / routes
            order = sorted(range(len(share)), key=lambda e: (-float(share[e]), e))
            row.top = [(e, float(share[e])) for e in order[:top] if share[e] > 0]
            p = share[share > 0]
            row.entropy_bits = float(-(p * torch.log2(p)).sum())
            covered, n = 0.0, 0
            for e in order:
                if covered >= coverage - 1e-12:
                    break
                covered += float(share[e])
                n += 1
            row.experts_for_coverage = n
        rows.append(row)
    return rows


def transition_probabilities(data: RoutingData, pos: int) -> torch.Tensor:
    """[E, E] P(next-layer route is expert b | token routed to expert a) between MoE layers pos and pos+1;
    rows of experts that routed no token are NaN."""
    t = data.transition_counts[pos].double()
    rows = t.sum(1, keepdim=True)
    return torch.where(rows > 0, t / rows.clamp_min(1), torch.full_like(t, float("nan")))


def usage_fractions(data: RoutingData) -> torch.Tensor:
    """[L, E] fraction of each layer's tokens routed to each expert (rows sum to top_k); NaN without tokens."""
    tok = torch.tensor(data.tokens, dtype=torch.float64).unsqueeze(1)
    c = data.expert_counts.double()
    return torch.where(tok > 0, c / tok.clamp_min(1), torch.full_like(c, float("nan")))


def format_usage_table(data: RoutingData, top: int = 3, coverage: float = 0.9) -> str:
    rows = layer_usage(data, top, coverage)
    pct = f"{coverage * 100:g}%"
    e = data.num_experts
    lines = [
        f"Routing statistics: {data.source}",
        f"source: {data.description}; {data.num_layers} MoE layers, {e} experts per layer"
        + (f", top-{data.top_k} routing" if data.top_k else ""),
        f"share = an expert's part of the layer's routes (each token is routed to top-k experts); entropy of "
        f"the route shares in bits (uniform: log2 {e} = {math.log2(e):.2f})",
        "",
    ]
    top_w = max(len("top experts (share of routes)"), 13 * max(top, 1))
    head = f"{'layer':>5}  {'tokens':>10}  {'routes':>10}  {'top experts (share of routes)':<{top_w}}  " \
           f"{'entropy':>7}  experts for {pct}"
    lines += [head, "-" * len(head)]
    for r in rows:
        tops = "  ".join(f"e{ex}: {s * 100:4.1f}%" for ex, s in r.top) or "-"
        ent = f"{r.entropy_bits:7.2f}" if r.routes else f"{'-':>7}"
        cov = f"{r.experts_for_coverage} of {e}" if r.routes else "-"
        lines.append(f"{r.layer:>5}  {r.tokens:>10}  {r.routes:>10}  {tops:<{top_w}}  {ent}  {cov}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def _matplotlib():
    """matplotlib and a Figure factory drawing with the Agg canvas (no pyplot, global backend untouched)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise StatsError(f"haq stats needs matplotlib for its heatmaps ({exc}): pip install matplotlib") from exc

    def agg_figure(**kwargs):
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    return matplotlib, agg_figure


def _cmap():
    matplotlib, _ = _matplotlib()
    return matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")


def _set_ticks(axis_ticks, axis_labels, labels: list, max_labels: int = 32) -> None:
    """Label every position when there are few, else every n-th (positions are matrix rows/columns)."""
    step = max(1, math.ceil(len(labels) / max_labels))
    pos = list(range(0, len(labels), step))
    axis_ticks(pos)
    axis_labels([str(labels[i]) for i in pos])


def _annotate(ax, m: torch.Tensor, vmax: float) -> None:
    """Write the values into the cells (small matrices only)."""
    rows, cols = m.shape
    size = 7 if rows * cols <= 64 else 5.5
    for i in range(rows):
        for j in range(cols):
            v = float(m[i, j])
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                        color="black" if vmax > 0 and v > 0.6 * vmax else "white")


def usage_figure(data: RoutingData):
    """Heatmap layers x experts of the fraction of each layer's tokens routed to each expert."""
    _, Figure = _matplotlib()
    frac = usage_fractions(data)
    n, e = frac.shape
    fig = Figure(figsize=(min(max(6.0, 0.42 * e + 2.8), 30.0), min(max(4.0, 0.36 * n + 2.0), 30.0)),
                 layout="constrained")
    ax = fig.add_subplot()
    vmax = float(torch.nan_to_num(frac, nan=0.0).max()) or 1.0
    im = ax.imshow(frac.numpy(), aspect="auto", cmap=_cmap(), vmin=0.0, vmax=vmax, interpolation="nearest")
    tokens = sorted(set(data.tokens))
    tok = f"{tokens[0]} tokens" if len(tokens) == 1 else f"{min(tokens)}–{max(tokens)} tokens per layer"
    ax.set_title(f"Expert usage per MoE layer ({data.description}; {tok})", fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    _set_ticks(ax.set_xticks, ax.set_xticklabels, list(range(e)))
    _set_ticks(ax.set_yticks, ax.set_yticklabels, data.layer_indices)
    if n * e <= 160:
        _annotate(ax, frac, vmax)
    k = f"\n(rows sum to top-k = {data.top_k})" if data.top_k else ""
    fig.colorbar(im, ax=ax, label=f"fraction of the layer's tokens routed to the expert{k}")
    return fig


def transition_figure(data: RoutingData, pos: int):
    """Heatmap of expert(a at MoE layer pos) -> expert(b at MoE layer pos+1) probabilities."""
    _, Figure = _matplotlib()
    if not 0 <= pos < data.num_layers - 1:
        raise StatsError(f"{data.source}: no MoE layer pair {pos} (there are {data.num_layers - 1})")
    p = transition_probabilities(data, pos)
    e = p.shape[0]
    src, dst = data.layer_indices[pos], data.layer_indices[pos + 1]
    side = min(max(5.0, 0.4 * e + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    vmax = float(torch.nan_to_num(p, nan=0.0).max()) or 1.0
    im = ax.imshow(p.numpy(), aspect="equal", cmap=_cmap(), vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(f"Expert transitions, layer {src} → layer {dst} ({data.description})", fontsize=10)
    ax.set_xlabel(f"expert b at layer {dst}")
    ax.set_ylabel(f"expert a at layer {src}")
    _set_ticks(ax.set_xticks, ax.set_xticklabels, list(range(e)))
    _set_ticks(ax.set_yticks, ax.set_yticklabels, list(range(e)))
    if e <= 16:
        _annotate(ax, p, vmax)
    fig.colorbar(im, ax=ax,
                 label="P(next-layer route is b | token routed to a)\n(rows sum to 1; grey: a got no tokens)")
    return fig


def transitions_grid_figure(data: RoutingData):
    """Every consecutive MoE-layer pair in one grid with one colour scale (an overview)."""
    _, Figure = _matplotlib()
    pairs = data.num_layers - 1
    if pairs < 1:
        raise StatsError(f"{data.source}: one MoE layer, so there are no layer-to-layer transitions")
    e = data.num_experts
    cols = min(pairs, max(1, math.ceil(math.sqrt(pairs))))
    rows = math.ceil(pairs / cols)
    cell = min(max(2.4, 0.09 * e + 1.6), 6.0)
    fig = Figure(figsize=(cols * cell + 1.6, rows * cell + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    probs = [transition_probabilities(data, i) for i in range(pairs)]
    vmax = max(float(torch.nan_to_num(p, nan=0.0).max()) for p in probs) or 1.0
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= pairs:
            ax.set_axis_off()
            continue
        im = ax.imshow(probs[i].numpy(), aspect="equal", cmap=_cmap(), vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {data.layer_indices[i]} → {data.layer_indices[i + 1]}", fontsize=9)
        _set_ticks(ax.set_xticks, ax.set_xticklabels, list(range(e)), max_labels=8)
        _set_ticks(ax.set_yticks, ax.set_yticklabels, list(range(e)), max_labels=8)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("expert a (layer l)", fontsize=8)
        if i >= pairs - cols:
            ax.set_xlabel("expert b (layer l+1)", fontsize=8)
    fig.suptitle(f"Expert transitions between consecutive MoE layers ({data.description}; rows sum to 1, "
                 "grey: expert a got no tokens)", fontsize=11)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="P(next-layer route is b | token routed to a)")
    return fig


def _save(fig, path: str, dpi: int) -> str:
    fig.savefig(path, dpi=dpi)
    return path


def write_report(data: RoutingData, out_dir: str, top: int = 3, coverage: float = 0.9,
                 dpi: int = 100) -> tuple[str, list[str]]:
    """Write usage.txt, usage.png, transitions.png and transitions/*.png; returns (table, written paths)."""
    if top < 1:
        raise StatsError(f"--top must be at least 1, got {top}")
    if not 0 < coverage <= 1:
        raise StatsError(f"--coverage must be in (0, 1], got {coverage}")
    if dpi < 10:
        raise StatsError(f"--dpi must be at least 10, got {dpi}")
    _matplotlib()  # fail before writing anything when matplotlib is missing
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise StatsError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    table = format_usage_table(data, top, coverage)
    written = []
    path = os.path.join(out_dir, USAGE_TXT)
    with open(path, "w") as f:
        f.write(table)
    written.append(path)
    written.append(_save(usage_figure(data), os.path.join(out_dir, USAGE_PNG), dpi))
    if data.num_layers > 1:
        written.append(_save(transitions_grid_figure(data), os.path.join(out_dir, TRANSITIONS_PNG), dpi))
        tdir = os.path.join(out_dir, TRANSITIONS_DIR)
        os.makedirs(tdir, exist_ok=True)
        width = len(str(max(data.layer_indices)))
        for pos in range(data.num_layers - 1):
            a, b = data.layer_indices[pos], data.layer_indices[pos + 1]
            name = f"layer_{a:0{width}d}_to_{b:0{width}d}.png"
            written.append(_save(transition_figure(data, pos), os.path.join(tdir, name), dpi))
    return table, written
