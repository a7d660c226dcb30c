"""Training configuration: the reference preset is the reference experiment, and TRL gets exactly those values."""

import shlex
from pathlib import Path

import pytest

from selfalign.errors import SelfAlignError
from selfalign.training.common import lora_config, trainer_arguments
from selfalign.training.config import PRESETS, TRL_FIELDS, TrainingConfig, load_training_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_reference_preset_is_the_reference_experiment():
    config = load_training_config(preset="reference")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 16, 0.1)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config.sft.learning_rate == 2e-4
    assert (config.dpo.learning_rate, config.dpo.beta) == (5e-5, 0.1)
    assert (config.epochs, config.batch_size, config.gradient_accumulation_steps) == (1, 4, 1)
    assert config.quantization == "auto"  # QLoRA wherever CUDA and bitsandbytes are present
    assert config == TrainingConfig()  # the defaults are the reference


def test_trl_and_peft_receive_the_reference_values(tmp_path):
    from trl import DPOConfig, SFTConfig

    config = load_training_config()
    sft = trainer_arguments(SFTConfig, config, tmp_path, config.sft, completion_only_loss=True)
    dpo = trainer_arguments(DPOConfig, config, tmp_path, config.dpo)
    for args in (sft, dpo):
        assert (args.num_train_epochs, args.per_device_train_batch_size, args.report_to) == (1, 4, [])
        assert not args.bf16 and not args.fp16  # fp32 on CPU, not TRL's bf16-everywhere default
    assert (sft.learning_rate, dpo.learning_rate, dpo.beta) == (2e-4, 5e-5, 0.1)
    assert sft.completion_only_loss
    assert sft.max_steps == dpo.max_steps == -1  # one epoch
    lora = lora_config(config.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 16, 0.1)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_each_method_may_set_its_own_step_count(tmp_path):
    from trl import DPOConfig, SFTConfig

    config = load_training_config(None, ["max_steps=24", "sft.max_steps=48"])
    sft = trainer_arguments(SFTConfig, config, tmp_path, config.sft)
    dpo = trainer_arguments(DPOConfig, config, tmp_path, config.dpo)
    assert (sft.max_steps, dpo.max_steps) == (48, 24)


def test_every_mapped_field_reaches_trl_under_its_trl_name(tmp_path):
    from trl import DPOConfig

    config = load_training_config(None, ["epochs=2", "batch_size=3", "optimizer=sgd", "lr_scheduler=constant",
                                         "gradient_accumulation_steps=5", "max_length=77", "save_total_limit=1",
                                         "warmup_ratio=0.25", "logging_steps=7", "save_steps=9", "seed=11",
                                         "gradient_checkpointing=false", "report_to=none"])  # fmt: skip
    args = trainer_arguments(DPOConfig, config, tmp_path, config.dpo)
    for name, trl_names in TRL_FIELDS.items():
        for trl_name in trl_names:
            assert getattr(args, trl_name) == getattr(config, name) or (name, trl_name) == ("report_to", "report_to")
    assert args.report_to == [] and args.optim == "sgd" and args.per_device_eval_batch_size == 3


def test_a_trl_setting_we_do_not_map_passes_through(tmp_path):
    from trl import DPOConfig, SFTConfig

    config = load_training_config(None, ["dpo.trl.loss_type=[ipo]", "dpo.trl.label_smoothing=0.1",
                                         "sft.trl.packing=true"])  # fmt: skip
    dpo = trainer_arguments(DPOConfig, config, tmp_path, config.dpo)
    sft = trainer_arguments(SFTConfig, config, tmp_path, config.sft)
    assert dpo.loss_type == ["ipo"] and dpo.label_smoothing == 0.1 and sft.packing is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.trl.no_such_field=1", "'dpo.trl': no_such_field: not a field of TRL's DPOConfig"),
        ("dpo.trl.learning_rate=1e-4", "'dpo.trl': learning_rate: set by sft/dpo.learning_rate here, not through trl:"),
        ("sft.trl.per_device_train_batch_size=8", "'sft.trl': per_device_train_batch_size: set by batch_size here"),
        ("sft.trl.bf16=true", "'sft.trl': bf16: set by dtype here"),
    ],
)
def test_a_pass_through_that_names_no_trl_field_or_one_we_set_is_refused(override, message):
    with pytest.raises(SelfAlignError) as raised:
        load_training_config(None, [override])
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_precedence_preset_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("preset: cpu-small\nmax_length: 200\nlora:\n  r: 8\n")
    config = load_training_config(path, ["lora.alpha=32"])
    assert config.preset == "cpu-small"
    assert not config.gradient_checkpointing  # from the preset
    assert (config.max_length, config.lora.r, config.lora.alpha, config.lora.dropout) == (200, 8, 32, 0.1)
    assert load_training_config(path, preset="reference").gradient_checkpointing  # the command line wins


@pytest.mark.parametrize(
    ("overrides", "preset", "message"),
    [
        (["lora.rank=8"], None, "unknown key 'lora.rank'"),
        (["dpo.beta=-1"], None, "invalid value for 'dpo.beta'"),
        ([], "huge", "unknown training preset 'huge'; presets: reference, cpu-small"),
    ],
)
def test_config_errors_name_the_key(overrides, preset, message):
    with pytest.raises(SelfAlignError, match=message):
        load_training_config(None, overrides, preset)


def test_one_logger_may_be_given_without_a_list():
    assert load_training_config(None, ["report_to=tensorboard"]).report_to == ["tensorboard"]


def test_every_preset_validates():
    for name in PRESETS:
        assert load_training_config(preset=name).preset == name


def _launch_command(path: Path) -> list[str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{path} must start with a comment giving its command"
    return shlex.split(first.removeprefix("# "))


def _check_selfalign_command(words: list[str]) -> None:
    """The `selfalign train ...` part parses with the real CLI, and its config and overrides validate."""
    from selfalign.cli.train import train_app

    assert words[:2] == ["selfalign", "train"], words
    command = __import__("typer").main.get_command(train_app)
    context = command.make_context("train", words[2:], resilient_parsing=False)
    sub = command.get_command(context, words[2])
    params = sub.make_context(words[2], words[3:]).params
    config = load_training_config(params["config"], params["overrides"], params["preset"])
    assert (ROOT / params["data"]).exists()
    assert config.model


def test_shipped_training_configs_validate_and_their_commands_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    paths = sorted((ROOT / "configs" / "training").glob("*.yaml"))
    assert paths
    for path in paths:
        words = _launch_command(path)
        assert f"configs/training/{path.name}" in words
        _check_selfalign_command(words)


def test_accelerate_configs_parse_and_start_with_their_launch_command(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(ROOT)
    names = {path.name for path in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert names >= {"ddp.yaml", "fsdp.yaml", "deepspeed-zero3.yaml", "cpu-2proc.yaml"}
    for name in sorted(names):
        words = _launch_command(ROOT / "configs" / "accelerate" / name)
        assert words[:4] == ["accelerate", "launch", "--config_file", f"configs/accelerate/{name}"], words
        assert words[4:6] == ["-m", "selfalign"]
        load_config_from_file(f"configs/accelerate/{name}")  # unknown keys raise
        _check_selfalign_command(words[5:])
