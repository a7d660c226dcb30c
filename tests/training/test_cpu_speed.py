import pytest
import torch

from selfalign.training import cpu_speed
from selfalign.training.common import bf16_matmuls
from selfalign.training.cpu_speed import AnswerLogProbs, frozen_matmuls_in_bf16, lm_head_on_answer_positions
from tests.training.conftest import tiny_config

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(scope="module")
def fused_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    return model


def batch():
    """Two rows: prompt positions (label -100), answer positions, and a padded tail on the second."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 9, 13, 14, 15, 16, 0, 0]])
    attention_mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    labels = input_ids.masked_fill(torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 1, 1]]).bool(), -100)
    return input_ids, attention_mask, labels


def rows_projected(monkeypatch):
    """Counts the rows TRL's chunked log-prob function and `AnswerLogProbs` are handed, by function."""
    from trl.kernels import ChunkedLogProbFunction

    seen = []
    for function in (ChunkedLogProbFunction, AnswerLogProbs):
        apply = function.apply

        def counting(hidden, *args, apply=apply, name=function.__name__):
            seen.append((name, hidden.shape[0]))
            return apply(hidden, *args)

        monkeypatch.setattr(function, "apply", counting)
    return seen


def forward(model, enabled):
    input_ids, attention_mask, labels = batch()
    model.zero_grad()
    with lm_head_on_answer_positions(enabled) as compact:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
    grad = model.get_output_embeddings().weight.grad.clone()
    return compact, out.log_probs.detach(), out.loss.item(), grad


def test_only_answer_positions_are_projected_and_the_numbers_do_not_change(fused_model, monkeypatch):
    seen = rows_projected(monkeypatch)
    full_flag, full, full_loss, full_grad = forward(fused_model, enabled=False)
    compact_flag, compact, compact_loss, compact_grad = forward(fused_model, enabled=True)
    assert (full_flag, compact_flag) == (False, True)
    # 2 rows x 7 shifted positions on CPU by default; with the switch, only the 4 + 3 labelled ones
    assert seen == [("ChunkedLogProbFunction", 14), ("AnswerLogProbs", 7)]
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-5)  # zero where unlabelled, in both
    assert compact_loss == pytest.approx(full_loss, rel=1e-6)
    torch.testing.assert_close(compact_grad, full_grad, rtol=1e-4, atol=1e-6)


def test_the_switch_is_restored_after_the_block_and_after_an_error():
    from trl.trainer import utils as trl_utils

    original, tiled = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    with pytest.raises(RuntimeError), lm_head_on_answer_positions():
        assert trl_utils._use_triton(torch.device("cpu")) is True
        assert trl_utils._ChunkedLogProbFunction is not tiled
        raise RuntimeError("stop")
    assert trl_utils._use_triton is original and original(torch.device("cpu")) is False
    assert trl_utils._ChunkedLogProbFunction is tiled


# ------------------------------------------------------------------ AnswerLogProbs against TRL's tiled function


def head_inputs(rows=9, vocab=300, width=16, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, width, generator=generator) * 2).requires_grad_()
    weight = torch.randn(vocab, width, generator=generator).requires_grad_()
    bias_ = torch.randn(vocab, generator=generator).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden, weight, bias_, targets


def outputs_and_grads(function, inputs, outputs, entropy_weight, temperature=0.7, logit_scale=1.3, chunk=64):
    hidden, weight, bias, targets = (x.detach().clone().requires_grad_(x.requires_grad) if x is not None else None
                                     for x in inputs)  # fmt: skip
    out = function.apply(hidden, weight, bias, targets, temperature, chunk, None, logit_scale, outputs)
    loss = -out[0].sum() + (entropy_weight * out[1].sum() if entropy_weight else 0)
    loss.backward()
    grads = [x.grad for x in (hidden, weight, bias) if x is not None]
    return out, grads


@pytest.mark.parametrize("outputs, entropy_weight", [(("log_probs",), 0), (ALL_OUTPUTS, 0), (ALL_OUTPUTS, 0.3)])
@pytest.mark.parametrize("slice_width", [cpu_speed.MIN_SLICE, 64])  # one slice of 300 words, or five (the last 44)
def test_answer_log_probs_match_trls_tiled_function(monkeypatch, outputs, entropy_weight, slice_width):
    from trl.kernels import ChunkedLogProbFunction

    monkeypatch.setattr(cpu_speed, "MIN_SLICE", slice_width)
    monkeypatch.setattr(cpu_speed, "SLICE_BUDGET", 1)
    assert cpu_speed.vocabulary_slice(9, 300) == min(slice_width, 300)
    inputs = head_inputs()
    ours, our_grads = outputs_and_grads(AnswerLogProbs, inputs, outputs, entropy_weight)
    theirs, their_grads = outputs_and_grads(ChunkedLogProbFunction, inputs, outputs, entropy_weight)
    for name, mine, reference in zip(ALL_OUTPUTS, ours, theirs):
        assert (mine is None) == (reference is None) == (name not in outputs), name
        if mine is not None:
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5, msg=name)
    assert len(our_grads) == 3
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slice_width", [cpu_speed.MIN_SLICE, 2])  # tied maxima in one slice, or across slices
def test_is_top1_counts_only_the_first_of_tied_maxima(monkeypatch, slice_width):
    monkeypatch.setattr(cpu_speed, "MIN_SLICE", slice_width)
    monkeypatch.setattr(cpu_speed, "SLICE_BUDGET", 1)
    weight = torch.eye(4)  # the hidden states are the logits
    hidden = torch.tensor([[1.0, 5.0, 5.0, 0.0], [1.0, 5.0, 5.0, 0.0], [9.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 5.0]])
    targets = torch.tensor([1, 2, 1, 2])
    is_top1 = AnswerLogProbs.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))[4]
    assert is_top1.tolist() == [True, False, False, True]


def test_the_vocabulary_slice_keeps_each_slices_logits_within_the_budget():
    assert cpu_speed.vocabulary_slice(170, 262_144) == 4096  # 170 x 4096 = 0.7M values; 8192 would pass 2^20
    assert cpu_speed.vocabulary_slice(670, 262_144) == cpu_speed.MIN_SLICE  # never narrower than MIN_SLICE
    assert cpu_speed.vocabulary_slice(1, 300) == 300  # never wider than the vocabulary
    assert cpu_speed.vocabulary_slice(0, 262_144) == cpu_speed.vocabulary_slice(1, 262_144)


def test_no_answer_rows_give_empty_outputs_and_a_zero_gradient():
    hidden, weight, bias, targets = head_inputs(rows=0)
    out = AnswerLogProbs.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ALL_OUTPUTS)
    assert [x.shape for x in out] == [torch.Size([0])] * 5
    out[0].sum().backward()
    assert hidden.grad.shape == (0, 16) and not weight.grad.any()


def test_within_log_probs_only_the_head_computes_nothing_else():
    from trl.trainer import utils as trl_utils

    args = (*head_inputs(), 1.0, 64, None, 1.0, ALL_OUTPUTS)
    with lm_head_on_answer_positions():
        full = trl_utils._ChunkedLogProbFunction.apply(*args)
        with cpu_speed.log_probs_only():
            alone = trl_utils._ChunkedLogProbFunction.apply(*args)
        after = trl_utils._ChunkedLogProbFunction.apply(*args)
    assert alone[1:] == (None,) * 4 and torch.equal(alone[0], full[0])
    assert all(x is not None for x in after) and not cpu_speed._log_probs_only


def test_without_gradients_nothing_is_kept_and_a_second_backward_is_refused():
    hidden, weight, bias, targets = head_inputs()
    with torch.no_grad():
        log_probs = AnswerLogProbs.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ("log_probs",))[0]
    assert log_probs.grad_fn is None
    log_probs = AnswerLogProbs.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ("log_probs",))[0]
    log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward only"):
        log_probs.sum().backward()


@pytest.mark.parametrize("case", ["soft-capped logits", "autocast", "more rows than the budget"])
def test_what_answer_log_probs_does_not_cover_goes_to_trls_function(monkeypatch, case):
    from trl.trainer import utils as trl_utils

    seen = rows_projected(monkeypatch)
    hidden, weight, bias, targets = head_inputs()
    softcap = 30.0 if case == "soft-capped logits" else None
    budget = hidden.shape[0] * weight.shape[0] - (case == "more rows than the budget")
    with monkeypatch.context() as patch, lm_head_on_answer_positions():
        patch.setattr(cpu_speed, "KEPT_BUDGET", budget)
        with torch.autocast("cpu", enabled=case == "autocast"):
            trl_utils._ChunkedLogProbFunction.apply(
                hidden, weight, bias, targets, 1.0, 64, softcap, 1.0, ("log_probs",)
            )
    with lm_head_on_answer_positions():  # the same call, none of the three: ours
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 64, None, 1.0, ("log_probs",))
    assert [name for name, _ in seen] == ["ChunkedLogProbFunction", "AnswerLogProbs"]


def layers():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "frozen": torch.nn.Linear(16, 8),
        "trained": torch.nn.Linear(16, 8),
        "q_proj": torch.nn.ModuleDict({"lora_A": torch.nn.ModuleDict({"default": torch.nn.Linear(16, 8)})}),
    })  # fmt: skip
    model["frozen"].requires_grad_(False)
    model["q_proj"].requires_grad_(False)  # a frozen LoRA layer, as DPO's reference copy of an adapter is
    return model


def in_bf16(layer, x):
    return torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()


def test_frozen_linear_layers_multiply_in_bf16_within_the_block_only():
    model, x = layers(), torch.randn(5, 16) * 3
    frozen, trained, lora = model["frozen"], model["trained"], model["q_proj"]["lora_A"]["default"]
    fp32 = {name: layer(x) for name, layer in (("frozen", frozen), ("trained", trained), ("lora", lora))}
    assert not torch.equal(in_bf16(frozen, x), fp32["frozen"])  # the two paths are told apart
    with frozen_matmuls_in_bf16(model) as on:
        assert on
        assert torch.equal(frozen(x), in_bf16(frozen, x)) and frozen(x).dtype == torch.float32
        assert torch.equal(trained(x), fp32["trained"])  # a weight that trains stays fp32
        assert torch.equal(lora(x), fp32["lora"])  # LoRA's layers are never switched
        with torch.no_grad():
            frozen.weight.mul_(2)  # changed in place: the copy is made again
        assert torch.equal(frozen(x), in_bf16(frozen, x))
    assert torch.equal(frozen(x), torch.nn.functional.linear(x, frozen.weight, frozen.bias))
    with pytest.raises(KeyError), frozen_matmuls_in_bf16(model):
        raise KeyError
    assert "forward" not in vars(frozen) and cpu_speed._bf16_copies is None
    with frozen_matmuls_in_bf16(model, enabled=False) as on:
        assert not on and torch.equal(trained(x), fp32["trained"]) and "forward" not in vars(frozen)


def test_a_frozen_bias_is_copied_once_and_a_trained_one_keeps_its_gradient():
    model, x = layers(), torch.randn(5, 16)
    frozen = model["frozen"]
    with frozen_matmuls_in_bf16(model):
        assert torch.equal(frozen(x), in_bf16(frozen, x))
        assert id(frozen.bias) in cpu_speed._bf16_copies.copies  # kept for the next call, not cast at each one
        frozen.bias.requires_grad_(True)  # a frozen weight with a bias that trains (BitFit)
        frozen(x).sum().backward()
    assert torch.equal(frozen.bias.grad, torch.full_like(frozen.bias, 5.0))  # d sum / d bias: one per row


def test_gradients_flow_through_a_frozen_bf16_layer_to_what_trains():
    model, x = layers(), torch.randn(5, 16)
    net = torch.nn.Sequential(model["trained"], torch.nn.Linear(8, 16).requires_grad_(False))
    (net(x) ** 2).sum().backward()
    fp32 = model["trained"].weight.grad.clone()
    model["trained"].weight.grad = None
    with frozen_matmuls_in_bf16(net):
        (net(x) ** 2).sum().backward()
    assert not torch.equal(model["trained"].weight.grad, fp32)
    torch.testing.assert_close(model["trained"].weight.grad, fp32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("entropy_in_loss", [True, False])  # False: the backward that forms its gradient in bf16
def test_a_frozen_lm_head_in_bf16_keeps_each_targets_logit_in_fp32(entropy_in_loss):
    hidden, weight, _, targets = head_inputs(rows=12, vocab=2000, width=64, bias=False)
    hidden = hidden.detach() * 0.2  # logits of std ~3, as a language model's
    hidden[0] = weight[targets[0]].detach() * 0.15  # a confident row: p(target) 0.96, where 1 - p must not cancel
    hidden.requires_grad_()
    weight.requires_grad_(False)
    args = (targets, 1.0, 64, None, 1.0, ALL_OUTPUTS)

    def loss(out):
        return (out[0] * torch.linspace(-1, 1, len(targets))).sum() + (out[1].sum() if entropy_in_loss else 0)

    exact = AnswerLogProbs.apply(hidden, weight, None, *args)
    assert -0.05 < exact[0][0] < -0.02
    loss(exact).backward()
    exact_grad, hidden.grad = hidden.grad.clone(), None
    with frozen_matmuls_in_bf16(torch.nn.Module()):
        low = AnswerLogProbs.apply(hidden, weight, None, *args)
        loss(low).backward()
    assert not torch.equal(low[0], exact[0])  # the bf16 product ran
    assert (low[0] <= 0).all()
    # the normaliser sums logits rounded to 8 significant bits (relative error < 2^-8)
    torch.testing.assert_close(low[0], exact[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(low[1], exact[1], rtol=0, atol=0.05)  # entropy, a logged metric
    assert (hidden.grad - exact_grad).norm() < 0.02 * exact_grad.norm()
    assert (hidden.grad[0] - exact_grad[0]).norm() < 0.02 * exact_grad[0].norm()  # the confident row too
    weight.requires_grad_(True)  # a head that trains is multiplied in fp32
    with frozen_matmuls_in_bf16(torch.nn.Module()):
        trained = AnswerLogProbs.apply(hidden.detach(), weight, None, *args)
    assert torch.equal(trained[0], exact[0])


def test_the_bf16_backward_writes_the_targets_entries_without_copying_the_kept_softmax():
    """The backward writes one entry a row into the kept [rows, vocabulary] exponentials; `scatter_` did it by
    copying the whole tensor twice on CPU (~60 ms of a DPO step with the embedded model's vocabulary)."""
    hidden, weight, _, targets = head_inputs(rows=12, vocab=2000, width=64, bias=False)
    weight.requires_grad_(False)
    with frozen_matmuls_in_bf16(torch.nn.Module()):
        log_probs = AnswerLogProbs.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs",))[0]
        with torch.profiler.profile(record_shapes=True) as profile:
            log_probs.sum().backward()
    whole = [event.name for event in profile.events() if [12, 2000] in (event.input_shapes or [])]
    assert "aten::mm" in whole  # the one product over the whole vocabulary ran
    assert not {"aten::copy_", "aten::clone", "aten::scatter_"} & set(whole), whole


@pytest.mark.parametrize(
    "setting, dtype, cpu_has_bf16, on",
    [("auto", "auto", True, True), ("auto", "auto", False, False), ("auto", "bfloat16", True, False),
     ("false", "auto", True, False), ("true", "auto", False, True)],
)  # fmt: skip
def test_bf16_matmuls_default_to_cpus_with_bf16_units_and_fp32_models(
    tmp_path, monkeypatch, setting, dtype, cpu_has_bf16, on
):
    from selfalign.models import loading

    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: cpu_has_bf16)
    config = tiny_config(tmp_path, f"bf16_matmuls={setting}", f"dtype={dtype}")
    assert bf16_matmuls(config) is on


# ------------------------------------------------------------------ LoRA's dropout from random bits


def test_the_dropout_mask_drops_each_value_with_probability_p_in_every_lane_of_a_draw():
    torch.manual_seed(0)
    mask = cpu_speed.dropped(torch.Size([1000, 1003]), 0.1)  # not a multiple of four: the last draw is cut
    assert mask.shape == (1000, 1003) and mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.002)
    # each 64-bit draw gives four 16-bit values: a lane with a fixed bit (e.g. a sign never set) would drift
    lanes = mask.view(-1)[: 1000 * 1000].view(-1, 4).float().mean(0)
    torch.testing.assert_close(lanes, torch.full((4,), 0.1), rtol=0, atol=0.003)
    assert not cpu_speed.dropped(torch.Size([10_000]), 0.0).any()  # 32,768 would wrap to -32,768 as an int16
    assert cpu_speed.dropped(torch.Size([0]), 0.5).numel() == 0


def lora_model(p=0.25):
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "q_proj": torch.nn.ModuleDict({"lora_dropout": torch.nn.ModuleDict({"default": torch.nn.Dropout(p)})}),
        "attention_dropout": torch.nn.Dropout(p),  # not LoRA's: left to torch
    })  # fmt: skip


def test_loras_dropout_layers_alone_draw_from_random_bits_within_the_block():
    model = lora_model()
    lora, other = model["q_proj"]["lora_dropout"]["default"], model["attention_dropout"]
    x = torch.randn(64, 96, requires_grad=True)
    with cpu_speed.lora_dropout_from_random_bits(model) as on:
        assert on and "forward" in vars(lora) and "forward" not in vars(other)
        torch.manual_seed(1)
        y = lora(x)
        torch.manual_seed(1)
        assert torch.equal(lora(x), y)  # the seeded generator's stream: reproducible
        torch.manual_seed(1)
        assert torch.equal(y == 0, cpu_speed.dropped(x.shape, 0.25))
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] / 0.75)
        y.sum().backward()
        torch.testing.assert_close(x.grad, kept.float() / 0.75)  # the gradient passes where the value was kept
        lora.eval()
        assert torch.equal(lora(x), x)  # evaluation: no dropout
        lora.train()
    assert "forward" not in vars(lora)
    with pytest.raises(KeyError), cpu_speed.lora_dropout_from_random_bits(model):
        raise KeyError
    assert "forward" not in vars(lora)
    with cpu_speed.lora_dropout_from_random_bits(model, enabled=False) as on:
        assert not on and "forward" not in vars(lora)
