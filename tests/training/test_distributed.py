"""Data-parallel training under `accelerate launch`: two processes on the CPU (DDP over gloo), SFT then DPO."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfalign.backends.llama_server import free_port

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "cpu-2proc.yaml"


def launch(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "selfalign", *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.slow  # about 25-30 s on 2 cores: two processes each import torch and TRL, twice
def test_two_processes_train_sft_then_dpo_data_parallel(tiny_model_dir, pairs_file, tmp_path):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    common = ["--data", str(pairs_file), "--model", str(tiny_model_dir), "--preset", "cpu-small", "max_steps=2",
              "max_length=64", "progress_bar=false"]  # fmt: skip
    launch("train", "sft", "--out", str(sft), *common)
    launch("train", "dpo", "--out", str(dpo), "--sft-adapter", str(sft), *common)
    for folder in (sft, dpo):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["train"]["processes"] == 2 and metrics["train"]["steps"] == 2
        assert (folder / "adapter_model.safetensors").is_file()
    assert metrics["reference_model"] == "frozen copy of the SFT adapter (PEFT adapter 'ref')"
    assert metrics["train"]["per_step"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_the_cli_destroys_an_initialized_process_group_at_exit():
    """Each process `accelerate launch` starts must destroy its process group before exiting (pytorch#179291)."""
    import torch.distributed as dist

    from selfalign.cli.main import _destroy_process_group

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    _destroy_process_group()
    assert not dist.is_initialized()
    _destroy_process_group()  # nothing to destroy: no error
