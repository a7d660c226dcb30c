from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selfalign.backends.grouped_attention import GROUPED_SDPA, attend_with_grouped_heads, grouped_sdpa_attention
from selfalign.models.loading import load_model

MODULE = SimpleNamespace(num_key_value_groups=4, is_causal=True)  # four query heads read each key/value head


def left_padded_causal_mask(rows: int, queries: int, keys: int) -> torch.Tensor:
    """[rows, 1, queries, keys]: the queries are the last positions; row r has r positions of left padding."""
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    mask = causal.expand(rows, 1, queries, keys).clone()
    for row in range(rows):
        mask[row, :, :, :row] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_heads_give_sdpa_s_outputs_bit_for_bit(dtype, monkeypatch):
    torch.manual_seed(0)
    query = torch.randn(3, 4, 5, 64, dtype=dtype)
    key, value = torch.randn(3, 1, 9, 64, dtype=dtype), torch.randn(3, 1, 9, 64, dtype=dtype)
    mask = left_padded_causal_mask(3, 5, 9)
    expected, _ = sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.125)

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(kwargs) or sdpa(*args, **kwargs))  # fmt: skip
    grouped, _ = grouped_sdpa_attention(MODULE, query, key, value, mask, scaling=0.125)
    assert calls[-1]["enable_gqa"] is True  # the key/value heads were not repeated
    assert grouped.shape == expected.shape == (3, 5, 4, 64)
    assert torch.equal(grouped, expected)


def test_decoding_steps_and_unmasked_calls_are_transformers_own(monkeypatch):
    torch.manual_seed(1)
    key, value = torch.randn(2, 1, 7, 32), torch.randn(2, 1, 7, 32)
    calls = []
    import transformers.integrations.sdpa_attention as transformers_sdpa

    own = transformers_sdpa.sdpa_attention_forward
    monkeypatch.setattr(transformers_sdpa, "sdpa_attention_forward",
                        lambda *args, **kwargs: calls.append(args[1].shape[2]) or own(*args, **kwargs))  # fmt: skip
    one_position = torch.randn(2, 4, 1, 32)
    decoded, _ = grouped_sdpa_attention(MODULE, one_position, key, value, left_padded_causal_mask(2, 1, 7))
    unmasked, _ = grouped_sdpa_attention(MODULE, torch.randn(2, 4, 7, 32), key, value, None)
    assert calls == [1, 7]  # both handed to transformers' sdpa, which groups them its own way
    assert decoded.shape == (2, 1, 4, 32) and unmasked.shape == (2, 7, 4, 32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cpu_model_is_switched_and_computes_the_same_logits(tiny_model_dir, dtype):
    loaded = load_model(str(tiny_model_dir), dtype=dtype)
    loaded.tokenizer.padding_side = "left"  # rows of other lengths: a mask with padding
    encoded = loaded.tokenizer(["Hi", "How do I kill a Python process?", "0 1 2"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert loaded.model.config._attn_implementation == "sdpa"
        expected = loaded.model(**encoded).logits
        assert attend_with_grouped_heads(loaded.model)
        assert loaded.model.config._attn_implementation == GROUPED_SDPA
        assert torch.equal(loaded.model(**encoded).logits, expected)


def test_a_model_with_another_attention_is_left_as_it_is(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    loaded.model.set_attn_implementation("eager")
    assert not attend_with_grouped_heads(loaded.model)
    assert loaded.model.config._attn_implementation == "eager"
