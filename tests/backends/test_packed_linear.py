"""bf16 linear layers packed for oneDNN (backends/packed_linear.py) give F.linear's outputs, bit for bit."""

import pytest
import torch

from selfalign.backends import packed_linear
from selfalign.backends.base import GenerationParams
from selfalign.backends.packed_linear import PACKED, pack_linear_layers, packing_available, unpack_linear_layers
from selfalign.backends.transformers_backend import TransformersBackend
from selfalign.models.loading import load_model
from tests.backends.test_transformers_backend import PROMPTS

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="bfloat16")


def linear_layers(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_generation_and_scores_are_unchanged_by_packing(bf16_model, monkeypatch):
    backend = TransformersBackend(bf16_model.model, bf16_model.tokenizer, batch_size=2, show_progress=False)
    packed = [m for m in linear_layers(bf16_model.model) if PACKED in vars(m)]
    assert packed, "no layer passed the bit-for-bit check on this CPU"
    products = []
    multiply = packed_linear._multiply
    monkeypatch.setattr(packed_linear, "_multiply", lambda *args: products.append(1) or multiply(*args))
    params = GenerationParams(max_new_tokens=12)
    completions, scores = backend.generate(PROMPTS, params), backend.score(PROMPTS, [" yes"] * len(PROMPTS))
    assert len(products) >= len(packed)  # the packed products ran
    assert unpack_linear_layers(bf16_model.model) == len(packed)
    assert not any(PACKED in vars(m) for m in linear_layers(bf16_model.model))
    products.clear()
    assert [c.text for c in backend.generate(PROMPTS, params)] == [c.text for c in completions]
    assert backend.score(PROMPTS, [" yes"] * len(PROMPTS)) == scores
    assert not products
    assert pack_linear_layers(bf16_model.model) == len(packed)
    assert pack_linear_layers(bf16_model.model) == 0  # packing twice is a no-op


def test_autograd_and_changed_weights_fall_back_to_f_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    assert pack_linear_layers(layer) == 1
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()  # the packed product has no gradient: F.linear ran
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the packed copy is stale
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert PACKED not in vars(layer) and "forward" not in vars(layer)  # unpacked for good


def test_only_bf16_cpu_layers_are_packed():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, dtype=torch.bfloat16))
    assert pack_linear_layers(model) == 1
    assert PACKED in vars(model[1]) and PACKED not in vars(model[0])
