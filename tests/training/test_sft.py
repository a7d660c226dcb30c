"""SFT on the tiny model: the tokenized example TRL trains on, a few steps to a loadable adapter, and resuming."""

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from selfalign.errors import SelfAlignError
from selfalign.training import common, cpu_speed
from selfalign.training.sft import run_sft
from tests.training.conftest import tiny_config


class KeepTrainingData(TrainerCallback):
    """The examples exactly as the trainer's data loader serves them (after TRL's tokenizing and masking)."""

    rows: list = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.rows = train_dataloader.dataset.to_list()


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_chat_model_dir"])
def test_each_example_has_one_bos_and_the_loss_covers_the_answer_only(model_fixture, request, pairs_file, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    kept = KeepTrainingData()
    config = tiny_config(model_dir, "max_steps=1", "eval_fraction=0", "max_length=512")  # nothing truncated
    run_sft(config, str(pairs_file), tmp_path / "out", callbacks=[kept])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = __import__("datasets").load_from_disk(str(tmp_path / "out" / "data" / "sft" / "train"))
    assert len(kept.rows) == len(examples) == 16
    for row, example in zip(kept.rows, examples):
        ids, labels = row["input_ids"], row["labels"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert set(labels[: len(prompt_ids)]) == {-100}  # every prompt token is masked
        assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]  # every answer token is a target
        assert ids[-1] == tokenizer.eos_token_id  # the answer ends the turn


def test_a_few_steps_write_a_loadable_adapter_and_metrics(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for secret in ("HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(secret, f"canary-{secret}")
    masks, heap_checks = [], []
    dropped = cpu_speed.dropped
    monkeypatch.setattr(cpu_speed, "dropped", lambda shape, p: masks.append(p) or dropped(shape, p))
    monkeypatch.setattr(common, "release_free_memory_over", lambda limit: heap_checks.append(limit) or False)
    out = tmp_path / "sft"
    outputs = run_sft(tiny_config(tiny_model_dir, "max_steps=3"), str(pairs_file), out)
    assert outputs.adapter == out
    assert masks == [0.1] * 3 * 2 * 7  # LoRA's dropout drew from random bits: each step, each adapted layer
    assert heap_checks == []  # SFT keeps its free heap for reuse (DPO hands it back past a limit)
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert any(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero: training changed it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert model.peft_config["default"].r == 16
    assert (out / "tokenizer.json").is_file() and (out / "trainer_state.json").is_file()
    assert "model: " in (out / "config.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "sft" and metrics["train"]["steps"] == 3
    assert [step["step"] for step in metrics["train"]["per_step"]] == [1, 2, 3]
    assert metrics["examples"] == {"train": 12, "eval": 4, "too_long": 0}
    assert metrics["eval_before"]["eval_loss"] > 0 and metrics["eval_after"]["eval_loss"] > 0
    assert {path.name for path in out.glob("*.bin")} <= {"training_args.bin"}  # weights are safetensors
    for path in [*out.glob("*.*"), *out.glob("checkpoints/**/*.*")]:
        assert b"canary-" not in path.read_bytes(), path  # secrets never reach configs, metrics or checkpoints


def test_prompts_longer_than_max_length_are_an_error(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(SelfAlignError, match=r"pairs.jsonl: every SFT prompt is at least max_length=4 tokens long"):
        run_sft(tiny_config(tiny_model_dir, "max_length=4"), str(pairs_file), tmp_path / "out")


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    config = tiny_config(tiny_model_dir, "max_steps=4", "save_steps=2", "eval_fraction=0")
    with pytest.raises(KeyboardInterrupt):
        run_sft(config, str(pairs_file), tmp_path / "resumed", callbacks=[InterruptAt(3)])
    assert [path.name for path in (tmp_path / "resumed" / "checkpoints").iterdir() if path.is_dir()] == ["checkpoint-2"]
    resumed = run_sft(config, str(pairs_file), tmp_path / "resumed").metrics["train"]
    straight = run_sft(config, str(pairs_file), tmp_path / "straight").metrics["train"]
    assert resumed["resumed_from"] == "checkpoint-2" and straight["resumed_from"] is None
    assert resumed["steps"] == straight["steps"] == 4
    final = {run["per_step"][-1]["step"]: run["per_step"][-1]["loss"] for run in (resumed, straight)}
    assert list(final) == [4]
    assert resumed["per_step"][-1]["loss"] == pytest.approx(straight["per_step"][-1]["loss"], rel=1e-4)


def test_a_half_written_checkpoint_is_passed_over_when_resuming(tmp_path):
    from types import SimpleNamespace

    from selfalign.training.common import last_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):  # kill -9 while checkpoint-6 was being saved
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    args, config = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(resume=True)
    assert last_checkpoint(args, config) == str(tmp_path / "checkpoint-4")
    assert last_checkpoint(args, SimpleNamespace(resume=False)) is None
