"""``haq stats``: routing statistics of a checkpoint (or a serving engine's stats_file) as a table and heatmaps.

The numbers in usage.txt and in the heatmaps are checked against counts computed here directly from the
routes (or from the raw safetensors tensors), not through offline/stats_report.py.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from offline.cli import main
from offline.routing import RoutingStats
from offline.stats_report import (
    load_checkpoint_routing,
    load_live_routing,
    transition_figure,
    transitions_grid_figure,
    usage_figure,
)
from vllm_haq.format import ROUTING_FILE, ROUTING_METADATA_KEY, HAQQuantConfig

pytest.importorskip("matplotlib", reason="haq stats needs matplotlib (in the test extra)")
import matplotlib.image  # noqa: E402

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+((?:e\d+: +[\d.]+%\s*)+)\s+([\d.]+)\s+(\d+) of (\d+)\s*$")


def _parse_table(text: str) -> dict[int, dict]:
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            tops = [(int(e), float(s)) for e, s in re.findall(r"e(\d+): +([\d.]+)%", m.group(4))]
            rows[int(m.group(1))] = {"tokens": int(m.group(2)), "routes": int(m.group(3)), "top": tops,
                                     "entropy": float(m.group(5)), "n90": int(m.group(6)), "experts": int(m.group(7))}
    return rows


def _check_table(rows: dict, layers: list[int], counts: np.ndarray, tokens: list[int], top: int = 3) -> None:
    """The table's numbers, recomputed from the counts here."""
    assert sorted(rows) == sorted(layers)
    for pos, layer in enumerate(layers):
        c = counts[pos].astype(np.float64)
        r = rows[layer]
        assert r["tokens"] == tokens[pos]
        assert r["routes"] == int(c.sum())
        share = c / c.sum()
        order = sorted(range(len(c)), key=lambda e: (-c[e], e))
        assert [e for e, _ in r["top"]] == [e for e in order[:top] if c[e] > 0]
        for e, s in r["top"]:
            assert abs(s - 100 * share[e]) <= 0.051
        p = share[share > 0]
        assert abs(r["entropy"] - float(-(p * np.log2(p)).sum())) <= 0.0051
        n90 = int(np.searchsorted(np.cumsum(np.sort(share)[::-1]), 0.9 - 1e-12) + 1)
        assert r["n90"] == n90 and r["experts"] == len(c)


def _check_png(path: str) -> None:
    assert os.path.getsize(path) > 0, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4), (path, img.shape)
    assert float(img[..., :3].std()) > 0.01, f"{path} looks blank"


def _colorbars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _check_labelled(fig, n_images: int = 1) -> None:
    """A titled main axes with labelled x and y axes, its image, and a colour bar."""
    main_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(main_axes) == n_images
    ax = main_axes[0]
    assert ax.get_title().strip() and ax.get_xlabel().strip() and ax.get_ylabel().strip()
    assert len(ax.images) == 1
    bars = _colorbars(fig)
    assert len(bars) == 1 and bars[0].get_ylabel().strip()


# --------------------------------------------------------------------------- a converted checkpoint


def test_report_of_a_converted_checkpoint(haq_dir, tmp_path, capsys):
    ckpt = haq_dir("mixtral")  # tiny random Mixtral, converted with routing statistics from calibration text
    out = tmp_path / "report"
    assert main(["stats", ckpt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    raw = load_file(os.path.join(ckpt, ROUTING_FILE))
    with safe_open(os.path.join(ckpt, ROUTING_FILE), "pt") as f:
        tokens = json.loads(f.metadata()[ROUTING_METADATA_KEY])["tokens"]
    layers = raw["layer_indices"].tolist()
    assert len(layers) == 2 and tokens > 0

    table = (out / "usage.txt").read_text()
    assert printed == table
    _check_table(_parse_table(table), layers, raw["expert_counts"].numpy(), [tokens] * len(layers))
    for name in ("usage.png", "transitions.png", "transitions/layer_0_to_1.png"):
        _check_png(str(out / name))
    assert sorted(os.listdir(out / "transitions")) == ["layer_0_to_1.png"]


def test_figures_are_labelled_and_show_the_counts(haq_dir):
    ckpt = haq_dir("mixtral")
    raw = load_file(os.path.join(ckpt, ROUTING_FILE))
    data = load_checkpoint_routing(ckpt)
    counts, trans = raw["expert_counts"].double(), raw["transition_counts"].double()

    fig = usage_figure(data)
    _check_labelled(fig)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    tokens = data.tokens[0]
    np.testing.assert_allclose(shown, (counts / tokens).numpy())
    np.testing.assert_allclose(shown.sum(1), 2.0)  # top-2: each token counted at two experts

    fig = transition_figure(data, 0)
    _check_labelled(fig)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    rows = trans[0].sum(1, keepdim=True)
    expect = torch.where(rows > 0, trans[0] / rows.clamp_min(1), torch.full_like(trans[0], float("nan")))
    np.testing.assert_allclose(shown, expect.numpy())

    grid = transitions_grid_figure(data)
    assert grid.get_suptitle().strip() and len(_colorbars(grid)) == 1
    assert sum(len(ax.images) for ax in grid.axes) == 1  # one pair


# --------------------------------------------------------------------------- statistics written by the real writer


def _moe_checkpoint(d, routes: dict[int, np.ndarray], num_layers: int, experts: int, top_k: int,
                    routing: bool = True) -> str:
    """config.json of a Qwen2-MoE whose MoE layers are ``routes``' keys, plus haq_routing.safetensors written
    by offline.routing.RoutingStats from the given top-k routes [tokens, top_k] per MoE layer."""
    os.makedirs(d, exist_ok=True)
    moe = sorted(routes)
    cfg = {"model_type": "qwen2_moe", "num_hidden_layers": num_layers, "num_experts": experts,
           "num_experts_per_tok": top_k, "decoder_sparse_step": 1,
           "mlp_only_layers": [i for i in range(num_layers) if i not in moe],
           "quantization_config": HAQQuantConfig(routing_statistics=ROUTING_FILE if routing else None).to_dict()}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    if routing:
        stats = RoutingStats(moe, experts)
        for layer in moe:
            stats.record(layer, torch.from_numpy(routes[layer]))
        save_file(stats.export(), os.path.join(d, ROUTING_FILE),
                  metadata={ROUTING_METADATA_KEY: json.dumps({"tokens": stats.tokens, "corpus": ["synthetic.txt"]})})
    return str(d)


def _skewed_routes(layers: list[int], tokens: int, experts: int, top_k: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.arange(experts, 0, -1, dtype=np.float64) ** 2
    out = {}
    for layer in layers:
        perm = rng.permutation(experts)
        out[layer] = np.stack([perm[rng.choice(experts, top_k, replace=False, p=p / p.sum())]
                               for _ in range(tokens)]).astype(np.int64)
    return out


def _direct_counts(routes: dict[int, np.ndarray], experts: int) -> tuple[np.ndarray, np.ndarray]:
    layers = sorted(routes)
    counts = np.stack([np.bincount(routes[layer].ravel(), minlength=experts) for layer in layers])
    trans = np.zeros((len(layers) - 1, experts, experts), dtype=np.int64)
    for i in range(len(layers) - 1):
        for a_row, b_row in zip(routes[layers[i]], routes[layers[i + 1]]):
            for a in a_row:
                for b in b_row:
                    trans[i, a, b] += 1
    return counts, trans


def test_report_follows_moe_layer_indices(tmp_path, capsys):
    layers, experts, top_k, tokens = [1, 2, 4], 6, 2, 300
    routes = _skewed_routes(layers, tokens, experts, top_k)
    ckpt = _moe_checkpoint(tmp_path / "ckpt", routes, num_layers=5, experts=experts, top_k=top_k)
    out = tmp_path / "report"
    assert main(["stats", ckpt, "--out", str(out), "--top", "2", "--dpi", "60"]) == 0
    table = capsys.readouterr().out
    counts, trans = _direct_counts(routes, experts)
    _check_table(_parse_table(table), layers, counts, [tokens] * 3, top=2)
    assert "synthetic.txt" in table
    assert sorted(os.listdir(out / "transitions")) == ["layer_1_to_2.png", "layer_2_to_4.png"]
    for name in ("usage.png", "transitions.png", "transitions/layer_2_to_4.png"):
        _check_png(str(out / name))

    data = load_checkpoint_routing(ckpt)
    fig = transition_figure(data, 1)
    ax = fig.axes[0]
    assert "layer 2" in ax.get_title() and "layer 4" in ax.get_title() and "4" in ax.get_xlabel()
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), trans[1] / trans[1].sum(1, keepdims=True))
    fig = usage_figure(data)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["1", "2", "4"]


# --------------------------------------------------------------------------- live counts of a serving engine


def test_live_counts_from_the_engine_stats_file(tmp_path, capsys):
    from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadEngine
    from vllm_haq.offload.cost import CostModel
    from vllm_haq.quant import quantize_weight_per_channel

    experts, hidden, inter, top_k = 4, 16, 8, 2
    g = torch.Generator().manual_seed(0)

    def layer_experts():
        w13 = [quantize_weight_per_channel(torch.randn(2 * inter, hidden, generator=g)) for _ in range(experts)]
        w2 = [quantize_weight_per_channel(torch.randn(hidden, inter, generator=g)) for _ in range(experts)]
        return ExpertTensors(torch.stack([q for q, _ in w13]), torch.stack([s for _, s in w13]).float(),
                             torch.stack([q for q, _ in w2]), torch.stack([s for _, s in w2]).float())

    path = tmp_path / "stats.json"
    cost = CostModel(h2d_bytes_per_s=1e9, expert_bytes=1000, cpu_overhead_s=1e-4, cpu_s_per_token=1e-5)
    engine = OffloadEngine(OffloadConfig(policy="haq", slots_per_layer=1, stats_file=str(path),
                                         stats_interval_s=1e-6), "cpu", torch.float32, cost=cost)
    layers = [0, 2]
    for layer in layers:
        engine.add_layer(layer, layer_experts())
    rng = np.random.default_rng(1)
    served = {layer: [] for layer in layers}

    def step(tokens: int, record: bool) -> None:
        x = torch.randn(tokens, hidden, generator=g)
        for layer in layers:
            ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
            engine.forward(layer, x, torch.full((tokens, top_k), 0.5), torch.from_numpy(ids).int(), record=record)
            if record:
                served[layer].append(ids)

    step(7, record=False)  # a warm-up step is not counted
    for tokens in (3, 1, 5, 1):
        step(tokens, record=True)
    engine.close()

    out = tmp_path / "live"
    assert main(["stats", "--live", str(path), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    routes = {layer: np.concatenate(served[layer]) for layer in layers}
    counts, trans = _direct_counts(routes, experts)
    _check_table(_parse_table(table), layers, counts, [10, 10])
    assert "served steps" in table
    for name in ("usage.png", "transitions.png", "transitions/layer_0_to_2.png"):
        _check_png(str(out / name))
    data = load_live_routing(str(path))
    assert data.top_k == top_k and torch.equal(data.transition_counts[0], torch.from_numpy(trans[0]))


# --------------------------------------------------------------------------- errors


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("haq stats: error: "), err
    return err[0]


def test_errors_name_the_file_and_the_problem(tmp_path, capsys):
    out = str(tmp_path / "out")
    routes = _skewed_routes([0, 1], 20, 4, 2)
    no_stats = _moe_checkpoint(tmp_path / "no-stats", routes, num_layers=2, experts=4, top_k=2, routing=False)
    msg = _error(capsys, ["stats", no_stats, "--out", out])
    assert "config.json" in msg and "carries no routing statistics" in msg

    missing = tmp_path / "does-not-exist"
    assert f"{missing}: no such directory" in _error(capsys, ["stats", str(missing), "--out", out])

    broken = _moe_checkpoint(tmp_path / "broken", routes, num_layers=2, experts=4, top_k=2)
    path = os.path.join(broken, ROUTING_FILE)
    t = load_file(path)
    t["expert_counts"] = t["expert_counts"][:, :3].contiguous()
    save_file(t, path)
    msg = _error(capsys, ["stats", broken, "--out", out])
    assert ROUTING_FILE in msg and "expert_counts" in msg and "shape" in msg  # the format's own validator

    old = tmp_path / "old-stats.json"
    old.write_text(json.dumps({"hits": 3, "misses": 1}))
    assert f"{old}: no 'routing' counts" in _error(capsys, ["stats", "--live", str(old), "--out", out])
    assert "exactly one" in _error(capsys, ["stats", "--out", out])
    assert not os.path.exists(out)  # nothing written on errors


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    text = capsys.readouterr().out
    for opt in ("CHECKPOINT", "--live", "--out", "--top", "--coverage", "--dpi"):
        assert opt in text
    assert text.count("default") >= 5


def test_buffered_online_statistics_equal_decaying_at_every_step():
    """The engine records every layer-step and folds once per model step: the same decayed counts,
    transitions and exact counts as decaying at each record (float rounding apart)."""
    from vllm_haq.offload.routing_stats import ONLINE_DECAY, RoutingStatistics

    layers, experts, k = 3, 6, 2
    stats = RoutingStatistics(layers, experts)
    g = torch.Generator().manual_seed(0)
    online = torch.zeros(layers, experts, dtype=torch.float64)
    trans = torch.zeros(layers - 1, experts, experts, dtype=torch.float64)
    exact = torch.zeros(layers - 1, experts, experts, dtype=torch.int64)
    for step in range(7):
        prev = None
        for layer in range(layers):
            tokens = 1 + step % 3
            ids = [torch.randperm(experts, generator=g)[:k].tolist() for _ in range(tokens)]
            counts = [sum(row.count(e) for row in ids) for e in range(experts)]
            stats.record(layer, counts, prev, ids)
            online[layer] = online[layer] * ONLINE_DECAY + torch.tensor(counts, dtype=torch.float64)
            if prev is not None:
                pairs = torch.zeros(experts, experts, dtype=torch.float64)
                for a_row, b_row in zip(prev, ids):
                    for a in a_row:
                        for b in b_row:
                            pairs[a, b] += 1
                trans[layer - 1] = trans[layer - 1] * ONLINE_DECAY + pairs
                exact[layer - 1] += pairs.long()
            prev = ids if step != 3 else None  # a step without transitions
        if step == 4:
            stats.record(0, [1] + [0] * (experts - 1), None, [[0, 1]])  # a partial step: folded on the next read
            online[0] = online[0] * ONLINE_DECAY + torch.tensor([1.0] + [0.0] * (experts - 1))
    served = stats.served(list(range(layers)))
    assert torch.allclose(stats.online, online, rtol=1e-12, atol=0)
    assert torch.allclose(stats.online_transition, trans, rtol=1e-12, atol=0)
    assert served["transition_counts"] == exact.tolist()
    assert served["expert_counts"] == stats.served_counts.tolist() and sum(served["tokens"]) > 0
