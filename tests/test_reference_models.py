"""offline.models (the converter's and the hf backend's forward pass) against transformers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from offline.models import LayerTensors, UnsupportedModelError, spec_for
from tiny_models import FAMILIES


def reference_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """Full-model forward of offline.models on every tensor of a single-file checkpoint."""
    with open(os.path.join(model_dir, "config.json")) as f:
        spec = spec_for(json.load(f))
    t = load_file(os.path.join(model_dir, "model.safetensors"))
    h = spec.embed(t, ids)
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        h = spec.layer_forward(i, LayerTensors({k[len(p):]: v for k, v in t.items() if k.startswith(p)}), h)
    return spec.head(t, h)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_forward_matches_transformers(family, tiny_dir):
    from transformers import AutoModelForCausalLM

    d = tiny_dir(family)
    ids = torch.randint(2, 500, (2, 48))
    ours = reference_logits(d, ids)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(ids).logits
    assert theirs.std() > 0.1  # the tiny model's logits are not flat
    assert float((ours - theirs).abs().max()) < 1e-4


def test_unsupported_architectures_are_named():
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        spec_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):  # supported, but without its factor
        spec_for({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}, "num_hidden_layers": 1})
    with pytest.raises(UnsupportedModelError, match="rope type 'mrope'.*not supported"):
        spec_for({"model_type": "llama", "rope_scaling": {"rope_type": "mrope"}, "num_hidden_layers": 1})
    with pytest.raises(UnsupportedModelError, match="post-LayerNorm"):
        spec_for({"model_type": "opt", "do_layer_norm_before": False, "hidden_size": 8})


def test_a_shared_w8a8_input_is_quantized_once_and_again_when_it_changes():
    """LayerTensors quantizes an input once for the linears that read it (q/k/v, gate/up), also under
    torch.inference_mode (generation; inference tensors keep no version counter: the first GPU run of the cache
    failed there), and again once the tensor is modified in place."""
    from vllm_haq.quant import quantize_weight_per_channel, w8a8_linear_reference

    gen = torch.Generator().manual_seed(0)
    w = {n: quantize_weight_per_channel(torch.randn(8, 16, generator=gen)) for n in ("a", "b")}
    lt = LayerTensors({f"{n}.{k}": v for n, (q, s) in w.items() for k, v in (("weight", q), ("weight_scale", s))})
    x = torch.randn(3, 16, generator=gen)

    def expect(n, x):
        return w8a8_linear_reference(x, *w[n])

    assert torch.equal(lt.linear("a", x), expect("a", x)) and torch.equal(lt.linear("b", x), expect("b", x))
    cached = lt._last_input[4]
    lt.linear("b", x)
    assert lt._last_input[4] is cached
    x.mul_(2)  # the same tensor, new values: quantized again
    assert torch.equal(lt.linear("a", x), expect("a", x)) and lt._last_input[4] is not cached
    with torch.inference_mode():
        xi = torch.randn(3, 16)
        assert torch.equal(lt.linear("a", xi), expect("a", xi)) and torch.equal(lt.linear("b", xi), expect("b", xi))
