"""DPO on the tiny model: the reference TRL uses, the first-step loss check, precomputed reference log-probs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from selfalign.errors import SelfAlignError
from selfalign.training import common, dpo
from selfalign.training.common import FirstStepLossCheck
from selfalign.training.cpu_speed import AnswerLogProbs
from selfalign.training.dpo import reference_fingerprint_by_xxhash, run_dpo, weights_fingerprint
from selfalign.training.sft import run_sft
from tests.training.conftest import make_pairs, tiny_config, write_pairs


class KeepTrainingData(TrainerCallback):
    rows: list = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.rows = train_dataloader.dataset.to_list()


@pytest.fixture(scope="module")
def module_pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_pairs(16))


@pytest.fixture(scope="module")
def dpo_from_base(tiny_model_dir, module_pairs, tmp_path_factory):
    kept = KeepTrainingData()
    out = tmp_path_factory.mktemp("dpo") / "out"
    outputs = run_dpo(tiny_config(tiny_model_dir), str(module_pairs), out, callbacks=[kept])
    return outputs, kept.rows


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, module_pairs, tmp_path_factory):
    """An SFT adapter trained hard enough (lr 1e-2) to move the policy well away from the base."""
    out = tmp_path_factory.mktemp("sft") / "adapter"
    run_sft(tiny_config(tiny_model_dir, "max_steps=4", "sft.learning_rate=0.01"), str(module_pairs), out)
    return out


def test_dpo_from_the_base_uses_the_base_as_reference_and_starts_at_ln2(dpo_from_base, tiny_model_dir):
    outputs, rows = dpo_from_base
    metrics = json.loads((outputs.adapter / "metrics.json").read_text())
    assert metrics["reference_model"] == "base model with the adapter disabled"
    assert metrics["reference_log_probs"] == "computed every step" and metrics["start"] == "base model"
    first = metrics["train"]["per_step"][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for split in ("eval_before", "eval_after"):
        assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"} <= set(metrics[split])
    assert metrics["eval_before"]["eval_rewards/margins"] == 0  # policy == reference before training
    weights = load_file(outputs.adapter / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for name, tensor in weights.items() if "lora_B" in name)  # training moved B
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in rows:  # one BOS, at the start of the prompt; none in the answers
        assert row["prompt_ids"][0] == tokenizer.bos_token_id
        assert (row["prompt_ids"] + row["chosen_ids"] + row["rejected_ids"]).count(tokenizer.bos_token_id) == 1


def test_precomputed_reference_log_probs_give_the_same_losses(
    dpo_from_base, tiny_model_dir, module_pairs, tmp_path, monkeypatch
):
    fingerprinted, heads = [], []
    monkeypatch.setattr(dpo, "weights_fingerprint", lambda module: fingerprinted.append(module) or "fingerprint")
    apply = AnswerLogProbs.apply

    def recording(hidden, *args):
        heads.append((torch.is_grad_enabled(), args[-1]))
        return apply(hidden, *args)

    monkeypatch.setattr(AnswerLogProbs, "apply", recording)
    heap_checks = []
    monkeypatch.setattr(common, "release_free_memory_over", lambda limit: heap_checks.append(limit) or False)
    config = tiny_config(tiny_model_dir, "dpo.precompute_ref_log_probs=true", "dpo.precompute_ref_batch_size=8")
    metrics = run_dpo(config, str(module_pairs), tmp_path / "out").metrics
    assert len(fingerprinted) == 1  # TRL named its reference cache by our fingerprint, not by its SHA-256
    # the reference passes come first: 12 training pairs in batches of 8, 4 evaluation pairs, log-probabilities only;
    # then evaluation and training steps, with the metrics TRL logs
    assert heads[:3] == [(False, ("log_probs",))] * 3
    assert all({"entropy", "is_top1"} <= set(outputs) for _, outputs in heads[3:]) and any(g for g, _ in heads[3:])
    assert heap_checks == [common.FREE_HEAP_LIMIT] * metrics["train"]["steps"]  # looked at after each step
    assert metrics["reference_log_probs"] == "precomputed once"
    plain = dpo_from_base[0].metrics["train"]["per_step"]
    assert [step["loss"] for step in metrics["train"]["per_step"]] == pytest.approx(
        [s["loss"] for s in plain], abs=1e-5
    )


def test_dpo_on_an_sft_adapter_uses_a_frozen_copy_of_it(sft_adapter, tiny_model_dir, module_pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = tiny_config(tiny_model_dir, f"dpo.sft_adapter={sft_adapter}")
    outputs = run_dpo(config, str(module_pairs), tmp_path / "out")
    assert outputs.metrics["reference_model"] == "frozen copy of the SFT adapter (PEFT adapter 'ref')"
    assert outputs.metrics["start"] == f"SFT adapter {sft_adapter}"
    assert outputs.metrics["train"]["per_step"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert not (outputs.adapter / "ref").exists()  # the frozen copy is not an output
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(outputs.adapter))


def test_a_loss_type_whose_first_loss_is_not_ln_2_passes_the_check(sft_adapter, tiny_model_dir, module_pairs,
                                                                     tmp_path):  # fmt: skip
    """IPO starts at (1 / (2 beta))^2 = 25 with beta 0.1, DPO plus the SFT loss above ln 2: the first-step check reads
    the implicit rewards, which start at 0 for every loss type."""
    config = tiny_config(tiny_model_dir, f"dpo.sft_adapter={sft_adapter}", "dpo.trl={loss_type: [ipo]}")
    first = run_dpo(config, str(module_pairs), tmp_path / "ipo").metrics["train"]["per_step"][0]
    assert first["loss"] == pytest.approx(25.0, abs=1e-3)


def test_a_broken_reference_fails_on_the_first_step(sft_adapter, tiny_model_dir, module_pairs, tmp_path, monkeypatch):
    """Simulate the known failure: the SFT adapter is the policy but the bare base is the reference."""
    import trl.trainer.dpo_trainer as dpo_trainer

    real_use_adapter = dpo_trainer.use_adapter
    monkeypatch.setattr(dpo_trainer, "use_adapter", lambda model, adapter_name: real_use_adapter(model, None))
    config = tiny_config(tiny_model_dir, f"dpo.sft_adapter={sft_adapter}", "eval_fraction=0")
    with pytest.raises(SelfAlignError, match=r"DPO's first-step implicit rewards are rewards/chosen -?\d"):
        run_dpo(config, str(module_pairs), tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("step", "logs", "fails"),
    [
        (1, {"loss": 0.6931}, False),
        (1, {"loss": 0.0004}, True),
        (1, {"loss": float("nan")}, True),
        (2, {"loss": 0.0004}, False),
        # with rewards logged, they decide, whatever the loss type: IPO's first loss at beta 0.1 is 25
        (1, {"loss": 25.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}, False),
        (1, {"loss": 0.6931, "rewards/chosen": 3.2, "rewards/rejected": 2.9}, True),
        (1, {"loss": 0.6931, "rewards/chosen": float("nan"), "rewards/rejected": 0.0}, True),
    ],
)
def test_the_first_step_check(step, logs, fails):
    check = FirstStepLossCheck(0.1, "base model with the adapter disabled")
    state = SimpleNamespace(global_step=step)
    if fails:
        with pytest.raises(SelfAlignError, match="the reference model, base model with the adapter disabled, is not"):
            check.on_log(None, state, None, logs=logs)
    else:
        check.on_log(None, state, None, logs=logs)


def test_an_adapter_folder_that_is_not_one_is_an_error(tiny_model_dir, module_pairs, tmp_path):
    config = tiny_config(tiny_model_dir, f"dpo.sft_adapter={tmp_path}")
    with pytest.raises(SelfAlignError, match="dpo.sft_adapter: .* is not a PEFT adapter folder"):
        run_dpo(config, str(module_pairs), tmp_path / "out")


def test_the_reference_fingerprint_replaces_trls_hash_within_the_block_only():
    from trl.trainer import dpo_trainer

    trls = dpo_trainer.hash_module
    with reference_fingerprint_by_xxhash():
        assert dpo_trainer.hash_module is weights_fingerprint
    assert dpo_trainer.hash_module is trls
    with pytest.raises(RuntimeError), reference_fingerprint_by_xxhash():
        raise RuntimeError("a failed DPO run")
    assert dpo_trainer.hash_module is trls


def test_the_weights_fingerprint_changes_with_any_weight_and_with_names_not_with_copies():
    import copy

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False).to(torch.bfloat16))
    model.register_buffer("mask", torch.tensor([True, False]))
    fingerprint = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == fingerprint
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].weight[0, 0] += 1  # one bf16 weight
    assert weights_fingerprint(changed) != fingerprint
    flipped = copy.deepcopy(model)
    flipped.mask[1] = True
    assert weights_fingerprint(flipped) != fingerprint
    # the same bytes under other names (TRL's hash sees dtypes and bytes only)
    renamed = torch.nn.Sequential()
    renamed.add_module("first", copy.deepcopy(model[0]))
    renamed.add_module("second", copy.deepcopy(model[1]))
    renamed.register_buffer("mask", model.mask.clone())
    assert weights_fingerprint(renamed) != fingerprint
    assert weights_fingerprint(model) == fingerprint  # reading the bytes in place changed nothing
