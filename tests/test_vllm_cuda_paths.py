"""What the vLLM adapter does on CUDA, checked on the CPU build against the vLLM code that CUDA runs.

vLLM's CPU build carries the same Python sources as its CUDA build: the model loader and the fused-MoE
runner below are the real ones, driven down their non-CPU branches (a "meta" target device, a platform
that is neither CPU nor TPU).
"""

from types import SimpleNamespace

import torch

from vllm_haq.vllm.moe_method import HAQMoEMethod, _keep_moe_out_of_cuda_graphs, moe_ops_in_graph


class _LoadProbe(HAQMoEMethod):
    """The real method's loading contract, with process_weights_after_loading recording what it was handed."""

    def __init__(self, offloading: bool):  # only what requires_device_loading reads
        self.offload = SimpleNamespace(offloading=offloading)
        self.seen: dict[str, str] = {}

    def process_weights_after_loading(self, layer) -> None:
        self.seen = {name: p.device.type for name, p in layer.named_parameters()}


def _moe_layer(method) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(torch.zeros(4, 6, 8, dtype=torch.int8), requires_grad=False)
    layer.w13_weight_scale = torch.nn.Parameter(torch.ones(4, 6, 1), requires_grad=False)
    layer.quant_method = method
    return layer


def test_offloaded_experts_stay_on_the_host_through_vllms_loader():
    """vLLM's loader moves a layer's CPU parameters to the target device around process_weights_after_loading
    unless the method says it needs no device loading: offloaded experts must reach the engine on the host."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    assert QuantizeMethodBase.requires_device_loading is True  # vLLM's default: what the method overrides
    config = SimpleNamespace(word_embeddings_untied_by_checkpoint=False, quantization="haq", dtype=torch.float32)
    method = _LoadProbe(offloading=True)
    model = torch.nn.Sequential(_moe_layer(method))
    process_weights_after_loading(model, config, torch.device("meta"))  # any non-CPU target: the CUDA branch
    assert method.seen == {"w13_weight": "cpu", "w13_weight_scale": "cpu"}
    assert all(p.device.type == "cpu" for p in model.parameters())
    # All resident, the layer is processed where it will run (the loader's device move applies).
    assert _LoadProbe(offloading=False).requires_device_loading is True


def test_graph_split_names_the_moe_op_vllm_calls_on_cuda(monkeypatch):
    """On CUDA vLLM calls MoE layers through its own opaque op; splitting on haq_moe_forward would leave the
    offloaded layers inside the captured graphs."""
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    called = {}
    for platform, cpu_or_tpu in (("cuda", False), ("cpu", True)):
        monkeypatch.setattr(moe_runner, "current_platform", SimpleNamespace(is_cpu=lambda p=platform: p == "cpu",
                                                                            is_tpu=lambda: False))
        for shared in (None, object()):
            entry = moe_runner.MoERunner._select_forward(SimpleNamespace(_shared_experts=shared))
            called.setdefault(platform, set()).add(getattr(entry, "_qualified_op_name", None))
        assert set(moe_ops_in_graph(cpu_or_tpu)) >= called[platform] - {None}
    assert called["cuda"] == set(moe_ops_in_graph(False))  # every CUDA entry is an op the split names
    assert called["cpu"] == {None}  # CPU calls the layer directly: haq_moe_forward itself is in the graph
    assert moe_ops_in_graph(True) == ("vllm::haq_moe_forward",)

    cfg = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                                                               splitting_ops=["vllm::unified_attention_with_output"]))
    _keep_moe_out_of_cuda_graphs(cfg)
    cc = cfg.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cc.splitting_ops == ["vllm::unified_attention_with_output", "vllm::moe_forward", "vllm::moe_forward_shared"]
    _keep_moe_out_of_cuda_graphs(cfg)  # once per MoE layer: no duplicates
    assert len(cc.splitting_ops) == 3
    eager = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode.NONE, splitting_ops=[]))
    _keep_moe_out_of_cuda_graphs(eager)
    assert eager.compilation_config.splitting_ops == []


def test_only_the_fused_resident_moe_may_be_captured_in_cuda_graphs(monkeypatch):
    """The per-expert loop (TP shards, per-expert smoothing, a non-Triton backend) and offloading read routes on
    the host; on CUDA they are split out of vLLM's graphs, only the fused Triton MoE stays inside."""
    import vllm_haq.vllm.moe_method as moe

    monkeypatch.setattr(moe, "select_backend",
                        lambda device: "triton" if torch.device(device).type == "cuda" else "torch")

    def method(offloading=False, explicit_smoothing=False, shard_amax=None):
        m = HAQMoEMethod.__new__(HAQMoEMethod)
        m.offload = SimpleNamespace(offloading=offloading)
        m.explicit_smoothing, m.shard_amax = explicit_smoothing, shard_amax
        return m

    cuda = torch.device("cuda")
    assert method()._fused(cuda)
    assert not method()._fused(torch.device("cpu"))
    assert not method(offloading=True)._fused(cuda)
    assert not method(explicit_smoothing=True)._fused(cuda)
    assert not method(shard_amax=lambda a: a)._fused(cuda)
    monkeypatch.setattr(moe, "select_backend", lambda device: "cutlass")
    assert not method()._fused(cuda)


def test_cuda_graph_padding_rows_are_not_routed_to_the_engine():
    """With CUDA graphs vLLM pads a step to a captured size; the eager MoE between graph pieces must not fetch,
    compute or count the padding rows. The real count comes from vLLM's own forward context (attention
    metadata's num_actual_tokens), as the GPU model runner sets it."""
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadEngine
    from vllm_haq.quant import quantize_weight_per_channel

    e, h, inter, real, padded = 4, 32, 48, 3, 8
    w13 = [quantize_weight_per_channel(torch.randn(2 * inter, h)) for _ in range(e)]
    w2 = [quantize_weight_per_channel(torch.randn(h, inter)) for _ in range(e)]
    experts = ExpertTensors(torch.stack([q for q, _ in w13]), torch.stack([s for _, s in w13]),
                            torch.stack([q for q, _ in w2]), torch.stack([s for _, s in w2]))
    engine = OffloadEngine(OffloadConfig(slots_per_layer=1), "cpu", torch.float32)
    engine.add_layer(0, experts)
    method = HAQMoEMethod.__new__(HAQMoEMethod)
    method.rotation, method.fused, method.engine, method.layer_index = None, None, engine, 0
    method.prefix = "model.layers.0.mlp.experts"
    x = torch.randn(padded, h)
    weights = torch.softmax(torch.randn(padded, 2), -1)
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(padded)]).int()
    ids[real:] = torch.tensor([2, 3], dtype=torch.int32)  # padding rows would route to experts no real token uses
    ids[:real] = torch.tensor([0, 1], dtype=torch.int32)
    meta = {"model.layers.0.self_attn.attn": SimpleNamespace(num_actual_tokens=real)}
    with set_forward_context(meta, VllmConfig(), num_tokens=padded):
        out = method.forward(x, weights, ids)
    stats = engine.stats()
    engine.close()
    assert stats["steps"] == 1 and stats["hits"] + stats["misses"] == 2, stats  # experts 0 and 1 only
    assert float(engine.routing_counts()[0, 2:].sum()) == 0.0  # padding never entered the live statistics
    assert torch.equal(out[real:], torch.zeros(padded - real, h))
    ref = OffloadEngine(OffloadConfig(), "cpu", torch.float32)
    ref.add_layer(0, experts)
    assert torch.equal(out[:real], ref.forward(0, x[:real], weights[:real], ids[:real]))
    ref.close()
