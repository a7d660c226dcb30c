import pytest
import torch

from selfalign.training import cpu_speed
from selfalign.training.cpu_speed import AnswerLogProbs, lm_head_on_answer_positions

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
@pytest.mark.parametrize("rows_budget", [cpu_speed.ROWS_BUDGET, 4 * 300])  # one block, or blocks of 4 rows
def test_answer_log_probs_match_trls_tiled_function(monkeypatch, outputs, entropy_weight, rows_budget):
    from trl.kernels import ChunkedLogProbFunction

    monkeypatch.setattr(cpu_speed, "ROWS_BUDGET", rows_budget)
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


def test_is_top1_counts_only_the_first_of_tied_maxima():
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [1.0, 5.0, 5.0, 0.0], [9.0, 2.0, 1.0, 0.0]])
    targets = torch.tensor([1, 2, 1])
    at_maximum = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) >= logits.amax(-1)
    assert cpu_speed.first_maximum(logits, targets, at_maximum).tolist() == [True, False, False]


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
