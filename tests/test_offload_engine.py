"""The offload engine without vLLM: every budget x policy gives the all-resident result bit for bit."""

import itertools
import json
import time

import pytest
import torch

from vllm_haq.kernels import cpu_fused_ok, cpu_moe_forward, int8_moe_forward
from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadConfigError, OffloadEngine, parse_offload_config
from vllm_haq.offload.planner import list_schedule
from vllm_haq.offload.policy import POLICIES, make_policy
from vllm_haq.offload.cost import CostModel, cold_experts, cpu_costs
from vllm_haq.offload.serving import Layer as HostLayer, cpu_worker_plan
from vllm_haq.quant import quantize_weight_per_channel

E, H, I, K, LAYERS = 8, 64, 96, 2, 4  # noqa: E741 (I: the experts' intermediate size)


def _layer_experts(seed: int, smooth: bool = False) -> ExpertTensors:
    g = torch.Generator().manual_seed(seed)
    w13 = [quantize_weight_per_channel(torch.randn(2 * I, H, generator=g)) for _ in range(E)]
    w2 = [quantize_weight_per_channel(torch.randn(H, I, generator=g)) for _ in range(E)]
    sm = torch.rand(E, H, generator=g) + 0.5 if smooth else None
    return ExpertTensors(torch.stack([q for q, _ in w13]), torch.stack([s for _, s in w13]).float(),
                         torch.stack([q for q, _ in w2]), torch.stack([s for _, s in w2]).float(), sm)


def _resident(experts: ExpertTensors, x, w, ids):
    """All experts resident, as vLLM's CPU build serves them: the CPU kernel where it is built (what the engine
    uses too; its SiLU is not torch's), else the per-expert loop."""
    if cpu_fused_ok(experts.w13):
        return cpu_moe_forward(x, w, ids, experts)
    g13, g2 = zip(*(experts.gemms(e, torch.float32) for e in range(E)))
    return int8_moe_forward(x, w, ids, list(g13), list(g2))


def _trace(steps: int, tokens: int, seed: int):
    """Skewed, temporally local routing: each step mostly reuses the previous step's experts."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    prev = torch.multinomial(hot, K, generator=g)
    for _ in range(steps):
        rows = []
        for _ in range(tokens):
            ids = prev.clone() if torch.rand(1, generator=g) < 0.5 else torch.multinomial(hot, K, generator=g)
            rows.append(ids)
        prev = rows[-1]
        yield torch.stack(rows).int()


def _routing_prior():
    counts = torch.tensor([[30, 20, 15, 10, 10, 8, 5, 2]] * LAYERS, dtype=torch.int64)
    trans = torch.ones(LAYERS - 1, E, E, dtype=torch.int64)
    trans[:, torch.arange(E), torch.arange(E)] = 20  # tokens tend to keep their expert id
    return {"expert_counts": counts, "transition_counts": trans, "layer_indices": torch.arange(LAYERS)}


BUDGETS = {"all": {}, "half": {"expert_fraction": 0.5}, "one slot": {"slots_per_layer": 1},
           "zero": {"slots_per_layer": 0}, "gib": {"expert_gib": 3 * 19_000 / 2**30}}


@pytest.mark.parametrize("policy", ["haq", "lru", "static"])
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("tokens", [1, 5])
def test_every_budget_and_policy_matches_all_resident_exactly(budget, policy, tokens):
    layers = [_layer_experts(100 + i, smooth=(i == 1)) for i in range(LAYERS)]
    engine = OffloadEngine(OffloadConfig(policy=policy, **BUDGETS[budget]), "cpu", torch.float32,
                           routing=_routing_prior())
    for i, experts in enumerate(layers):
        engine.add_layer(i, experts)
    g = torch.Generator().manual_seed(7)
    for ids in _trace(12, tokens, seed=tokens):
        x = torch.randn(tokens, H, generator=g)
        for i, experts in enumerate(layers):
            w = torch.softmax(torch.randn(tokens, K, generator=g), -1)
            got = engine.forward(i, x, w, ids)
            want = _resident(experts, x, w, ids)
            assert torch.equal(got, want), f"layer {i}: max diff {(got - want).abs().max()}"
            x = torch.tanh(got)
    s = engine.stats()
    engine.close()
    assert s["steps"] == 12 * LAYERS and s["hits"] + s["misses"] > 0
    if budget == "all":
        assert s["misses"] == 0 and s["hit_rate"] == 1.0
        return
    assert s["misses"] > 0, s
    if budget == "zero" or policy == "static":
        assert s["fetches"] == 0 and s["cpu_experts"] == s["misses"] and s["cpu_expert_tokens"] >= s["misses"]
    assert s["fetches"] + s["cpu_experts"] == s["misses"]
    if policy == "lru" and min(s["slots_per_layer"]) > 0:  # on-demand: every miss is fetched, nothing else moves
        assert s["fetches"] == s["misses"] and s["cpu_experts"] == 0
        # expert_bytes is the largest expert: layer 1's, which carry smoothing vectors (H float32 each)
        assert s["fetches"] * (s["expert_bytes"] - 4 * H) <= s["bytes_h2d"] <= s["fetches"] * s["expert_bytes"]
    assert s["slots"] * (s["expert_bytes"] - 4 * H) <= s["device_cache_bytes"] <= s["slots"] * s["expert_bytes"]
    if budget == "half":
        assert s["slots"] == LAYERS * E // 2
    if budget == "gib":
        assert s["slots"] == int(3 * 19_000 // s["expert_bytes"])
        # measured: the bytes of the cache tensors the engine actually allocated stay within the budget
        allocated = sum(t.numel() * t.element_size() for layer in engine.order if layer.cache is not None
                        for t in layer.cache.parts())  # counted here, not with the engine's own helper
        assert allocated == s["device_cache_bytes"] <= 3 * 19_000


def test_haq_prefetch_predicts_next_layer_and_counts_accuracy():
    layers = [_layer_experts(200 + i) for i in range(LAYERS)]
    # "always": on this CPU the hand-off to the copier thread costs more than copying a tiny expert,
    # so "auto" would rightly skip these prefetches (see test_auto_prefetch_only_when_it_pays)
    # a fixed cost model where fetching beats the CPU: the plan (and so the hit rate) does not depend on timings
    cheap_fetch = CostModel(h2d_bytes_per_s=1e12, expert_bytes=19_000, cpu_overhead_s=1e-3, cpu_s_per_token=1e-4)
    engine = OffloadEngine(OffloadConfig(policy="haq", slots_per_layer=3, prefetch="always"), "cpu", torch.float32,
                           routing=_routing_prior(), cost=cheap_fetch)
    for i, experts in enumerate(layers):
        engine.add_layer(i, experts)
    g = torch.Generator().manual_seed(3)
    for step in range(20):
        e = step % E  # every layer routes the token to the same experts: the transitions predict it
        ids = torch.tensor([[e, (e + 1) % E]], dtype=torch.int32)
        x = torch.randn(1, H, generator=g)
        for i in range(LAYERS):
            out = engine.forward(i, x, torch.full((1, K), 0.5), ids)
            assert torch.equal(out, _resident(layers[i], x, torch.full((1, K), 0.5), ids))
    s = engine.stats()
    assert s["prefetches"] > 0 and s["prefetch_hits"] > 0 and s["prefetch_accuracy"] > 0.5, s
    # prefetched experts become hits at the next layer: far more hits than the static placement gives
    assert s["hit_rate"] > 0.5, s


def test_warmup_steps_are_not_recorded():
    layers = [_layer_experts(300 + i) for i in range(2)]
    engine = OffloadEngine(OffloadConfig(policy="lru", slots_per_layer=1), "cpu", torch.float32)
    for i, experts in enumerate(layers):
        engine.add_layer(i, experts)
    ids = torch.tensor([[0, 5], [3, 4]], dtype=torch.int32)
    for i in range(2):
        engine.forward(i, torch.randn(2, H), torch.ones(2, K), ids, record=False)
    assert engine.stats()["steps"] == 0 and engine.stats()["misses"] == 0
    assert engine.routing_counts().sum() == 0
    engine.forward(0, torch.randn(2, H), torch.ones(2, K), ids)
    assert engine.stats()["steps"] == 1 and engine.routing_counts()[0, 5] == 1


def test_failed_cpu_job_is_recomputed_once_and_a_persistent_failure_surfaces_for_that_step(monkeypatch):
    import vllm_haq.offload.host_jobs as jobs_module

    layers = [_layer_experts(400)]
    engine = OffloadEngine(OffloadConfig(policy="static", slots_per_layer=0), "cpu", torch.float32)
    engine.add_layer(0, layers[0])
    ids = torch.tensor([[1, 2]], dtype=torch.int32)
    x, w = torch.randn(1, H), torch.ones(1, K)
    expected = _resident(layers[0], x, w, ids)
    engine.forward(0, x, w, ids)
    fused = engine._fused
    real = jobs_module.cpu_expert_routes if fused else engine.layers[0].host_gemms[1][0]
    failures = []

    def flaky(*args, **kwargs):  # fails the first time only: a transient fault
        if not failures:
            failures.append(1)
            if fused:
                args[-1].fill_(7.0)  # a partial write into the route buffer first
            raise RuntimeError("simulated CPU worker failure")
        return real(*args, **kwargs)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated CPU worker failure")

    def install(fn):
        if fused:  # all CPU experts of a step are one kernel call
            monkeypatch.setattr(jobs_module, "cpu_expert_routes", fn)
        else:
            engine.layers[0].host_gemms[1] = (fn, engine.layers[0].host_gemms[1][1])

    install(flaky)
    assert torch.equal(engine.forward(0, x, w, ids), expected)  # absorbed: recomputed from host memory
    assert engine.stats()["recovered_faults"] == 1
    install(broken)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"layer 0 experts? \[?1\b.*: its CPU job failed .* failed too"):
        engine.forward(0, x, w, ids)
    assert time.monotonic() - t0 < 5  # surfaces at once: no hang
    install(real)
    assert torch.equal(engine.forward(0, x, w, ids), expected)  # and the engine keeps serving
    engine.close()


def test_failed_copy_is_served_from_host_and_never_serves_the_slot(monkeypatch):
    import vllm_haq.offload.engine as engine_module

    layers = [_layer_experts(450)]
    cheap_fetch = CostModel(h2d_bytes_per_s=1e12, expert_bytes=19_000, cpu_overhead_s=1e-3, cpu_s_per_token=1e-4)
    engine = OffloadEngine(OffloadConfig(policy="lru", slots_per_layer=1), "cpu", torch.float32, cost=cheap_fetch)
    engine.add_layer(0, layers[0])
    w, x = torch.ones(1, K), torch.randn(1, H)
    ids = torch.tensor([[1, 2]], dtype=torch.int32)
    engine.forward(0, x, w, ids)
    real_copy = engine_module.copy_expert

    def failing_copy(dst, slot, src, expert, non_blocking=False):
        dst.w13[slot].fill_(7)  # a partial write: the slot's contents are now garbage
        raise RuntimeError("simulated copy failure")

    monkeypatch.setattr(engine_module, "copy_expert", failing_copy)
    ids = torch.tensor([[3, 4]], dtype=torch.int32)
    assert torch.equal(engine.forward(0, x, w, ids), _resident(layers[0], x, w, ids))
    assert engine.stats()["recovered_faults"] == 2  # both fetches failed; both experts computed from host memory
    monkeypatch.setattr(engine_module, "copy_expert", real_copy)
    for pair in ([3, 4], [4, 3], [1, 3]):  # the half-written slot is refetched, never served as a hit
        ids = torch.tensor([pair], dtype=torch.int32)
        assert torch.equal(engine.forward(0, x, w, ids), _resident(layers[0], x, w, ids))
    engine.close()


def test_stats_file_is_written(tmp_path):
    path = tmp_path / "stats.json"
    engine = OffloadEngine(OffloadConfig(policy="lru", slots_per_layer=1, stats_file=str(path),
                                         stats_interval_s=1e-6), "cpu", torch.float32)
    engine.add_layer(0, _layer_experts(500))
    engine.forward(0, torch.randn(3, H), torch.ones(3, K), torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32))
    engine.close()
    data = json.loads(path.read_text())
    assert data["misses"] >= 5 and data["policy"] == "lru" and data["slots"] == 1


def test_slot_allocation_follows_expected_gain():
    shares = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.25, 0.25, 0.25, 0.25]])
    haq, lru, static = (make_policy(p) for p in ("haq", "lru", "static"))
    assert haq.slots(2, shares) == [1, 1]
    assert haq.slots(4, shares) == [1, 3]  # the flat layer gains more from slots 2..4
    assert lru.slots(3, shares) == [2, 1]
    assert static.slots(99, shares) == [4, 4]


def test_planner_balances_copy_engine_and_cpu():
    cost = CostModel(h2d_bytes_per_s=1e9, expert_bytes=10_000_000, cpu_overhead_s=1e-3, cpu_s_per_token=2e-3)
    # fetch 10 ms; CPU 3 ms for 1 token, 41 ms for 20 tokens
    fetch, cpu = make_policy("haq").split({0: 20, 1: 1, 2: 1}, cost, num_slots=2)
    assert fetch == [0] and sorted(cpu) == [1, 2]
    # fetched experts still need the device: a device busy with 50 ms of hits sends even the big miss to the CPU
    slow_device = CostModel(h2d_bytes_per_s=1e9, expert_bytes=10_000_000, cpu_overhead_s=1e-3, cpu_s_per_token=2e-3,
                            device_overhead_s=5e-3)
    assert make_policy("haq").split({0: 20, 1: 1, 2: 1}, slow_device, 2) == ([0], [1, 2])
    assert make_policy("haq").split({0: 20, 1: 1, 2: 1}, slow_device, 2, device_busy_s=50e-3) == ([], [0, 1, 2])
    # admission: fetching a cold expert over a hot one is declined when the CPU serves it about as fast,
    # but a miss with many tokens (prefill) is still fetched
    even = CostModel(h2d_bytes_per_s=1e9, expert_bytes=1_000_000, cpu_overhead_s=1e-3, cpu_s_per_token=1e-4,
                     device_overhead_s=1e-4)
    assert make_policy("haq").split({0: 1}, even, 1) == ([0], [])
    assert make_policy("haq").split({0: 1}, even, 1, admission=lambda: ({0: 0.5}, [2.0])) == ([], [0])
    assert make_policy("haq").split({0: 1}, even, 1, admission=lambda: ({0: 2.5}, [2.0])) == ([0], [])
    assert make_policy("haq").split({0: 1000}, even, 1, admission=lambda: ({0: 0.5}, [2.0])) == ([0], [])
    assert make_policy("lru").split({0: 20, 1: 1}, cost, 2) == ([0, 1], [])
    assert make_policy("static").split({0: 20, 1: 1}, cost, 2) == ([], [0, 1])
    assert make_policy("haq").split({0: 20, 1: 1}, cost, 0) == ([], [0, 1])


def test_policies_are_objects_chosen_by_name_in_one_place():
    """The engine asks its policy; victims: LRU the least recently used slot, haq the lowest keep-value and
    none when a prefetch would evict something worth more than it brings."""
    from vllm_haq.offload import OffloadConfig as Config

    assert sorted(POLICIES) == sorted(("haq", "lru", "static"))
    with pytest.raises(ValueError, match="not one of"):
        make_policy("fifo")

    class Layer:
        last_use, expert_of_slot, predicted = [5, 2, 9], [0, 1, 2], None

    share = lambda: torch.tensor([0.1, 0.8, 0.1])  # noqa: E731
    assert make_policy("lru").victim(Layer, [0, 1, 2], 10, share) == 1
    assert make_policy("haq").victim(Layer, [0, 1, 2], 10, share) == 0  # expert 1 is hot, slot 2 recent
    assert make_policy("haq").victim(Layer, [0, 1, 2], 10, share, keep_above=0.0) is None
    assert make_policy("haq").prefetches and not make_policy("lru").prefetches
    engine = OffloadEngine(Config(policy="static"), "cpu", torch.float32)
    assert engine.policy.name == "static"


def test_auto_prefetch_only_when_it_pays():
    cost = CostModel(h2d_bytes_per_s=1e9, expert_bytes=1_000_000, cpu_overhead_s=1e-3, cpu_s_per_token=1e-4,
                     prefetch_issue_s=2e-4)  # fetch 1 ms, CPU 1.1 ms, issuing 0.2 ms
    assert cost.prefetch_pays(0.5) and not cost.prefetch_pays(0.1)
    # a device no faster than the CPU (the CPU build): a hit saves little, prefetching rarely pays
    same_speed = CostModel(h2d_bytes_per_s=1e9, expert_bytes=1_000_000, cpu_overhead_s=1e-3, cpu_s_per_token=1e-4,
                           prefetch_issue_s=2e-4, device_overhead_s=1e-3, device_s_per_token=1e-4)
    assert not same_speed.prefetch_pays(1.0)
    layers = [_layer_experts(500 + i) for i in range(LAYERS)]
    engine = OffloadEngine(OffloadConfig(policy="haq", slots_per_layer=3), "cpu", torch.float32,
                           routing=_routing_prior())
    for i, experts in enumerate(layers):
        engine.add_layer(i, experts)
    engine.forward(0, torch.randn(1, H), torch.full((1, K), 0.5), torch.tensor([[0, 1]], dtype=torch.int32))
    assert engine.cost.prefetch_issue_s >= 0 and engine.cost.as_dict()["prefetch_issue_ms"] >= 0
    engine.cost.prefetch_issue_s = float("inf")  # no prefetch can pay for itself
    for step in range(6):
        ids = torch.tensor([[step % E, (step + 1) % E]], dtype=torch.int32)
        for i in range(LAYERS):
            engine.forward(i, torch.randn(1, H), torch.full((1, K), 0.5), ids)
    assert engine.stats()["prefetches"] == 0
    engine.close()


def test_offload_settings_parse_from_additional_config_and_environment():
    c = parse_offload_config({"haq": {"expert_fraction": 0.25, "policy": "lru", "cpu_threads": 3, "prefetch": "off",
                                      "stats_file": "/tmp/s.json", "stats_interval_s": 5}}, environ={})
    assert (c.expert_fraction, c.policy, c.cpu_threads, c.prefetch, c.stats_file, c.stats_interval_s) == \
        (0.25, "lru", 3, "off", "/tmp/s.json", 5.0)
    assert c.offloading and not parse_offload_config(None, environ={}).offloading
    env = {"HAQ_SLOTS_PER_LAYER": "2", "HAQ_OFFLOAD_POLICY": "static", "HAQ_PREFETCH": "true"}
    c = parse_offload_config({}, environ=env)
    assert (c.slots_per_layer, c.policy, c.prefetch) == (2, "static", "auto")
    # additional_config's budget replaces the environment's, other keys still fall back to it
    c = parse_offload_config({"haq": {"expert_gib": 1.5}}, environ=env)
    assert (c.expert_gib, c.slots_per_layer, c.policy) == (1.5, None, "static")
    assert parse_offload_config({"haq": {"prefetch": "always"}}, environ={}).prefetch == "always"
    assert parse_offload_config({"haq": {"prefetch": False}}, environ={}).prefetch == "off"


@pytest.mark.parametrize("section, message", [
    ({"expert_fraction": 1.5}, "haq.expert_fraction=1.5 is invalid: expected a number in [0, 1]"),
    ({"slots_per_layer": -1}, "haq.slots_per_layer=-1 is invalid"),
    ({"slots_per_layer": 1.5}, "haq.slots_per_layer=1.5 is invalid"),
    ({"expert_gib": "lots"}, "haq.expert_gib='lots' is invalid"),
    ({"policy": "fifo"}, "haq.policy='fifo' is invalid: expected one of"),
    ({"cpu_threads": 0}, "haq.cpu_threads=0 is invalid"),
    ({"prefetch": "sometimes"}, "haq.prefetch='sometimes' is invalid"),
    ({"stats_interval_s": 0}, "haq.stats_interval_s=0 is invalid"),
    ({"slots_per_layer": 1, "expert_fraction": 0.5}, "haq budget given more than once"),
    ({"budget": 3}, "unknown keys ['budget']"),
])
def test_impossible_offload_settings_are_refused_with_the_key(section, message):
    with pytest.raises(OffloadConfigError) as err:
        parse_offload_config({"haq": section}, environ={})
    assert message in str(err.value)


def test_environment_errors_name_the_variable_and_too_many_slots_is_refused():
    with pytest.raises(OffloadConfigError, match="environment HAQ_EXPERT_FRACTION: haq.expert_fraction='x'"):
        parse_offload_config(None, environ={"HAQ_EXPERT_FRACTION": "x"})
    with pytest.raises(OffloadConfigError, match="slots_per_layer=9 exceeds the model's 8 experts"):
        OffloadConfig(slots_per_layer=9).slots_for(4, 8, 1000)
    with pytest.raises(OffloadConfigError, match="must be a JSON object"):
        parse_offload_config({"haq": "fast"}, environ={})


def test_calibration_times_each_cpu_expert_cold():
    """The CPU expert timings walk every expert of every layer before one comes back (as decode meets them,
    from DRAM): timing one expert again and again timed the H200 host's 300 MiB L3, not its memory. So do its
    many-expert calls (k experts of one layer a call)."""
    layers = [HostLayer(i, _layer_experts(700 + i)) for i in range(LAYERS)]
    walk = cold_experts(layers)
    first = [next(walk) for _ in range(LAYERS * E)]
    assert all(len(es) == 1 for _, es in first)
    assert len({(layer.index, es[0]) for layer, es in first}) == LAYERS * E
    assert [(layer.index, es) for layer, es in (next(walk) for _ in range(LAYERS * E))] == \
        [(layer.index, es) for layer, es in first]
    k = 3  # does not divide E: the last call of a layer wraps to its first experts
    calls = list(itertools.islice(cold_experts(layers, k), 50))
    assert all(len(set(es)) == k for _, es in calls)
    per_layer = -(-E // k)
    assert {(layer.index, e) for layer, es in calls[: LAYERS * per_layer] for e in es} == \
        {(i, e) for i in range(LAYERS) for e in range(E)}


def test_cpu_costs_split_a_layer_steps_call_from_its_experts():
    """A layer-step's CPU experts are one call: its fixed part (the hand-off, the thread team's start) is paid
    once, each expert in it costs its weights' read and its tokens. On the H200 host one Qwen3 expert alone
    calibrated 0.327 ms, while eight in one call took 0.094 ms each: charging every CPU miss the whole first
    figure sent the planner's misses to the copy engine (offload.md, fourth run)."""
    call, expert, token = 0.25e-3, 0.08e-3, 0.02e-3
    t = lambda n, m: call + n * (expert + m * token)  # noqa: E731
    got = cpu_costs(t(1, 1), t(1, 16), t(8, 1), 8)
    assert got == pytest.approx((call, expert, token), rel=1e-9)
    # noise never makes a part negative
    assert all(v >= 0 for v in cpu_costs(1e-3, 0.9e-3, 0.5e-3, 8))
    cost = CostModel(h2d_bytes_per_s=1e9, expert_bytes=200_000, cpu_overhead_s=expert, cpu_s_per_token=token,
                     cpu_call_s=call)  # a fetch: 0.2 ms
    lumped = CostModel(h2d_bytes_per_s=1e9, expert_bytes=200_000, cpu_overhead_s=call + expert, cpu_s_per_token=token)
    misses = {e: 1 for e in range(8)}  # one-token misses, as at batch 1

    def makespan(plan):  # under the true costs: copies and the CPU call run side by side
        fetch, cpu = plan
        return max(len(fetch) * cost.fetch_s(), (call + len(cpu) * cost.cpu_s(1)) if cpu else 0.0)

    split, old = list_schedule(misses, list(misses), cost), list_schedule(misses, list(misses), lumped)
    assert (len(split[0]), len(split[1])) == (3, 5) and (len(old[0]), len(old[1])) == (5, 3)
    assert makespan(split) == pytest.approx(0.75e-3) and makespan(old) == pytest.approx(1.0e-3)
    assert list_schedule({3: 1}, [3], cost) == ([3], [])  # alone, a miss is cheaper fetched (0.2 < 0.35 ms)


def test_cpu_worker_plan_gives_the_fused_call_the_host():
    """With the CPU kernel a layer-step's CPU experts are one call: one worker with all cores but two (the model
    thread's and one for the rest of the server; the H200 host's first run used 4 of 16); without it, cores/4
    workers share the cores."""
    assert cpu_worker_plan(True, None, 16) == (1, 14)  # the model thread's core and one for the server's rest
    assert cpu_worker_plan(True, None, 2) == (1, 1)
    assert cpu_worker_plan(True, 6, 16) == (1, 6)
    assert cpu_worker_plan(True, None, 1) == (1, 1)
    assert cpu_worker_plan(False, None, 16) == (4, 4)
    assert cpu_worker_plan(False, 2, 16) == (2, 8)
    assert cpu_worker_plan(False, None, 64) == (8, 8)
