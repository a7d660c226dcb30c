"""scripts/gpu_check.sh on a machine without a GPU: it parses, plans every check, and runs to completion on the
parts a CPU can check, skipping the rest with their reasons and printing the table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECKS = ("qlora", "vllm", "reference-configs", "multi-gpu", "generation", "training")


def gpu_check(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """check -> (result, details) from the Markdown table."""
    rows = re.findall(r"^\| (.+?) \| (\w+) \| (.*?) \| \d* \|$", stdout, re.M)
    return {check: (result, details) for check, result, details in rows if check != "check"}


def test_the_script_parses_and_a_dry_run_plans_every_check_with_existing_tests(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = gpu_check("--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    planned = dict(re.findall(r"^\[([\w-]+)\] (.*)$", result.stdout, re.M))
    assert set(CHECKS) <= set(planned), result.stdout
    for check in ("qlora", "vllm", "reference-configs"):
        tests = re.search(r"(tests/\S+\.py)", planned[check]).group(1)
        assert (ROOT / tests).is_file(), tests
    assert "-m slow" in planned["vllm"]  # the vLLM file's GPU tests are its slow ones
    assert "configs/accelerate/ddp.yaml" in planned["multi-gpu"]
    assert not (tmp_path / "out" / "table.md").exists()  # nothing ran


def test_an_unknown_check_is_refused():
    result = gpu_check("--only", "qlora,vlm")
    assert result.returncode == 2 and "unknown check 'vlm'" in result.stderr


def test_install_and_multi_gpu_complete_on_a_cpu_machine_skipping_with_reasons(tmp_path):
    """An empty wheel folder stands in for one that lacks a package: pip's reason is the row's."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has several GPUs: the multi-GPU check would run")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = gpu_check("--only", "install,multi-gpu", "--wheels", str(wheels), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert rows["multi-gpu"] == ("skipped", f"needs 2 or more CUDA GPUs; this machine has {torch.cuda.device_count()}")
    installs = {check: row for check, row in rows.items() if check.startswith("install")}
    assert installs, result.stdout
    for check, (status, details) in installs.items():
        if check != "install":  # a missing requirement: pip finds nothing in the empty folder
            assert status == "skipped" and "No matching distribution found" in details, (check, details)
    assert (tmp_path / "out" / "table.md").read_text() in result.stdout


@pytest.mark.slow  # a pytest run inside: about a minute on 2 busy cores, most of it importing TRL
def test_a_pytest_selection_becomes_a_row_with_its_skip_reasons(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the QLoRA test would run rather than skip")
    result = gpu_check("--only", "qlora", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    status, details = table_rows(result.stdout)["qlora"]
    assert status == "skipped"
    assert details == "1 skipped<br>test_qlora_sft_then_dpo_on_a_4bit_base: QLoRA needs a CUDA GPU and bitsandbytes"


def test_the_generation_benchmarks_baseline_batches_a_tokenizer_without_a_pad_token(tmp_path):
    """The GPU check runs benchmarks/generation.py on any model: a transformers pipeline refuses to batch with
    Mistral's tokenizer (no pad token) unless the baseline pads with EOS, as selfalign's own loading does."""
    import importlib.util

    from selfalign.backends.base import GenerationParams
    from tests.tiny_model import build_tiny_mistral

    spec = importlib.util.spec_from_file_location("generation_benchmark", ROOT / "benchmarks" / "generation.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    model = build_tiny_mistral(tmp_path / "tiny-mistral")
    prompts = ["[INST] Tell me a joke [/INST]", "[INST] Write a short poem about the rain [/INST]"]
    seconds, useful_tokens, _ = benchmark.run_baseline(
        str(model), prompts, GenerationParams(max_new_tokens=4, stop=["\nQuestion:"])
    )
    assert seconds > 0 and useful_tokens > 0  # re-encoded answers: random bytes may take more tokens than made them
