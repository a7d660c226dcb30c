import pytest
import torch

from selfalign.training.cpu_speed import lm_head_on_answer_positions


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
    """Counts the rows TRL's chunked log-prob function is handed."""
    from trl.trainer import utils as trl_utils

    seen = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        seen.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
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
    assert seen == [14, 7]
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-5)  # zero where unlabelled, in both
    assert compact_loss == pytest.approx(full_loss, rel=1e-6)
    torch.testing.assert_close(compact_grad, full_grad, rtol=1e-4, atol=1e-6)


def test_the_switch_is_restored_after_the_block_and_after_an_error():
    from trl.trainer import utils as trl_utils

    original = trl_utils._use_triton
    with pytest.raises(RuntimeError), lm_head_on_answer_positions():
        assert trl_utils._use_triton(torch.device("cpu")) is True
        raise RuntimeError("stop")
    assert trl_utils._use_triton is original and original(torch.device("cpu")) is False
