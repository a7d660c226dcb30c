"""QLoRA: SFT and DPO on a 4-bit NF4 base. Needs a CUDA GPU and bitsandbytes; skipped elsewhere."""

import importlib.util
import math

import pytest
import torch

from selfalign.training.dpo import run_dpo
from selfalign.training.sft import run_sft
from tests.training.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs a CUDA GPU and bitsandbytes",
)


def test_qlora_sft_then_dpo_on_a_4bit_base(tiny_model_dir, pairs_file, tmp_path):
    sft = run_sft(tiny_config(tiny_model_dir, "quantization=auto"), str(pairs_file), tmp_path / "sft")
    assert sft.metrics["quantization"] == "4bit-nf4"
    dpo = run_dpo(tiny_config(tiny_model_dir, "quantization=4bit"), str(pairs_file), tmp_path / "dpo")
    assert dpo.metrics["quantization"] == "4bit-nf4"
    assert dpo.metrics["reference_model"] == "base model with the adapter disabled"
    assert dpo.metrics["train"]["per_step"][0]["loss"] == pytest.approx(math.log(2), abs=0.01)  # bf16 compute
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()
