"""`training.launcher`: the run's SFT and DPO stages train in a child `accelerate launch -m selfalign train ...`.

The fast tests check the setting, the device checks before any stage, the stage keys and a failing child with
stand-ins for the other stages' bodies (and for accelerate, where only the child's exit matters); the slow one runs
`selfalign run` on the tiny model with both training stages launched in two CPU processes."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfalign.errors import SelfAlignError
from selfalign.pipeline import launcher as launcher_module
from selfalign.pipeline import run_pipeline
from selfalign.pipeline import stages as stages_module
from selfalign.pipeline.config import load_run_config
from selfalign.pipeline.outputs import TrainedAdapter
from selfalign.shipped_configs import SHIPPED_CONFIGS
from tests.pipeline.stand_ins import replace_stages, stand_in

CPU_2PROC = "configs/accelerate/cpu-2proc.yaml"


def launch_with(accelerate, num_processes=None) -> str:
    """The `training.launcher=...` override."""
    count = "" if num_processes is None else f", num_processes: {num_processes}"
    return f"training.launcher={{accelerate: {accelerate}{count}}}"


LAUNCH_CPU = launch_with(CPU_2PROC)


@pytest.fixture
def ran(monkeypatch):
    """Stand-ins for every stage but training, which keeps its real stage function unless a test replaces it."""
    calls = []
    replace_stages(monkeypatch, calls, keep=("run_sft", "run_dpo"))
    monkeypatch.setattr(launcher_module, "available_cores", lambda: 2)  # what cpu-2proc asks for, on any machine
    return calls


@pytest.fixture
def trained(ran, monkeypatch):
    """Training stages that record their kind and write an adapter folder, instead of training."""
    for function in ("run_sft", "run_dpo"):
        monkeypatch.setattr(stages_module, function, stand_in(TrainedAdapter, ran))
    return ran


def demo(tmp_path, *overrides):
    return load_run_config(None, [f"out={tmp_path / 'run'}", *overrides])


def run_config_file(tmp_path, launcher: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "training": {"launcher": launcher}}))
    return path


# ---- the setting, checked when the run config loads -------------------------------------------------------------


def test_a_launcher_file_that_does_not_exist_names_the_run_config_and_the_field(tmp_path):
    path = run_config_file(tmp_path, {"accelerate": "configs/accelerate/fsdp2.yaml"})
    with pytest.raises(SelfAlignError) as error:
        load_run_config(path)
    assert str(error.value) == (
        f"{path}: invalid value for 'training.launcher.accelerate': configs/accelerate/fsdp2.yaml: no such file here, "
        "nor a shipped config (`selfalign configs list`)"
    )


@pytest.mark.parametrize(
    ("launcher", "message"),
    [
        ({"accelerate": CPU_2PROC, "num_processes": 0}, "'training.launcher.num_processes': Input should be greater "
         "than or equal to 1"),
        ({"accelerate": CPU_2PROC, "num_processes": -2}, "'training.launcher.num_processes': Input should be greater"),
        ({"num_processes": 2}, "missing required key 'training.launcher.accelerate'"),
        ({"accelerate": "configs/demo.yaml"}, "'training.launcher': " + str(SHIPPED_CONFIGS / "demo.yaml") + ": not an "
         "accelerate config (no distributed_type)"),
    ],
)  # fmt: skip
def test_bad_launcher_settings_fail_when_the_run_config_loads(tmp_path, launcher, message):
    path = run_config_file(tmp_path, launcher)
    with pytest.raises(SelfAlignError, match=re.escape(message)) as error:
        load_run_config(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_a_file_without_a_process_count_or_for_several_machines_is_refused(tmp_path):
    unset = tmp_path / "unset.yaml"
    unset.write_text("distributed_type: MULTI_GPU\nnum_processes: -1\n")
    with pytest.raises(SelfAlignError, match="num_processes -1 is no process count; set num_processes here"):
        demo(tmp_path, launch_with(unset))
    assert demo(tmp_path, launch_with(unset, 3)).training.launcher.processes == 3
    two_machines = tmp_path / "two.yaml"
    two_machines.write_text("distributed_type: MULTI_GPU\nnum_processes: 16\nnum_machines: 2\n")
    with pytest.raises(SelfAlignError, match="num_machines 2: `selfalign run` launches training on its own machine"):
        demo(tmp_path, launch_with(two_machines))


def test_a_shipped_accelerate_config_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped file is meant
    for name in (CPU_2PROC, "accelerate/cpu-2proc"):
        launcher = demo(tmp_path, launch_with(name)).training.launcher
        assert launcher.config_file == SHIPPED_CONFIGS / "accelerate" / "cpu-2proc.yaml"
        assert launcher.processes == 2  # the file's
    mine = tmp_path / "configs" / "accelerate" / "cpu-2proc.yaml"  # a file of that path here comes first
    mine.parent.mkdir(parents=True)
    mine.write_text("distributed_type: MULTI_GPU\nuse_cpu: true\nnum_processes: 1\n")
    launcher = demo(tmp_path, launch_with(CPU_2PROC)).training.launcher
    assert launcher.config_file == mine.resolve() and launcher.processes == 1
    assert demo(tmp_path, launch_with(CPU_2PROC, 2)).training.launcher.processes == 2  # the setting's over the file's


# ---- devices, checked before any stage runs -------------------------------------------------------------------


def test_more_gpu_processes_than_gpus_fail_before_any_stage(tmp_path, trained, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = demo(tmp_path, launch_with("configs/accelerate/ddp.yaml"))  # num_processes: 8
    with pytest.raises(SelfAlignError) as error:
        run_pipeline(config)
    assert str(error.value) == (
        f"training.launcher: {SHIPPED_CONFIGS / 'accelerate' / 'ddp.yaml'}: 8 processes of type MULTI_GPU, one per "
        "GPU, but 2 GPUs are visible here; set training.launcher.num_processes to at most 2"
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(
        SelfAlignError, match="FSDP, one per GPU, but 0 GPUs are visible here; train without a launcher"
    ):
        run_pipeline(demo(tmp_path, launch_with("configs/accelerate/fsdp.yaml", 1)))
    assert trained == [] and not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    run_pipeline(config)  # as many GPUs as processes: the run goes ahead
    assert trained == ["tune-judge", "preferences", "sft", "dpo", "evaluate", "report"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the finished run, read on a machine without GPUs
    run_pipeline(config)
    run_pipeline(config, from_stage="report")  # nothing that trains will run: the launch is not checked
    assert trained == ["tune-judge", "preferences", "sft", "dpo", "evaluate", "report", "report"]
    with pytest.raises(SelfAlignError, match="8 processes of type MULTI_GPU, one per GPU, but 0 GPUs"):
        run_pipeline(config, from_stage="dpo")


def test_gpu_ids_limit_the_gpus_a_launch_may_use(tmp_path, trained, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    two_ids = tmp_path / "two-ids.yaml"
    two_ids.write_text(
        (SHIPPED_CONFIGS / "accelerate" / "ddp.yaml").read_text().replace("gpu_ids: all", "gpu_ids: 0,1")
    )
    with pytest.raises(SelfAlignError, match="8 processes of type MULTI_GPU, one per GPU, but 2 GPUs are visible"):
        run_pipeline(demo(tmp_path, launch_with(two_ids)))
    assert trained == []


def test_more_cpu_processes_than_cores_fail_before_any_stage(tmp_path, trained):
    with pytest.raises(SelfAlignError) as error:
        run_pipeline(demo(tmp_path, launch_with(CPU_2PROC, 3)))
    assert str(error.value) == (
        f"training.launcher: {SHIPPED_CONFIGS / 'accelerate' / 'cpu-2proc.yaml'}: 3 CPU processes, but this process "
        "may use 2 cores; set training.launcher.num_processes to at most 2"
    )
    assert trained == []


def test_a_key_accelerate_refuses_fails_before_any_stage(tmp_path, trained):
    typo = tmp_path / "typo.yaml"
    typo.write_text((SHIPPED_CONFIGS / "accelerate" / "cpu-2proc.yaml").read_text() + "num_procesess: 2\n")
    with pytest.raises(SelfAlignError, match=r"typo.yaml: accelerate cannot read it: .*num_procesess"):
        run_pipeline(demo(tmp_path, launch_with(typo)))
    assert trained == []


# ---- the stage keys -------------------------------------------------------------------------------------------


def test_the_launcher_leaves_the_keys_alone_but_several_processes_retrain(tmp_path, trained):
    plain, _ = run_pipeline(demo(tmp_path), dry_run=True)
    one, _ = run_pipeline(demo(tmp_path, launch_with(CPU_2PROC, 1)), dry_run=True)
    assert [p.key for p in one] == [p.key for p in plain]  # one process trains as a run without a launcher does

    run_pipeline(demo(tmp_path, LAUNCH_CPU))
    trained.clear()
    plan, _ = run_pipeline(demo(tmp_path, launch_with("configs/accelerate/ddp.yaml", 2)), dry_run=True)
    assert not any(p.will_run for p in plan)  # two processes, launched otherwise: the same effective batch
    plan, _ = run_pipeline(demo(tmp_path, LAUNCH_CPU), dry_run=True)
    assert [p.stage.settings.get("processes") for p in plan if p.stage.kind in ("sft", "dpo")] == [2, 2]
    plan, _ = run_pipeline(demo(tmp_path), dry_run=True)  # one process: another effective batch
    assert [p.stage.name for p in plan if p.will_run] == ["sft", "dpo", "evaluate", "report"]


# ---- the child: its output, its failure ----------------------------------------------------------------------


def test_the_childs_lines_go_to_the_log_and_a_failure_is_one_line(caplog):
    script = "import sys; print('step 1'); print('error: no pairs left', file=sys.stderr); sys.exit(3)"
    with caplog.at_level("INFO", logger="selfalign.pipeline.launcher"):
        with pytest.raises(SelfAlignError) as error:
            launcher_module.run_logged([sys.executable, "-c", script], "sft", "sft: accelerate launch with F")
    assert str(error.value) == "sft: accelerate launch with F exited with status 3 (error: no pairs left)"
    assert "sft | step 1" in caplog.messages and "sft | error: no pairs left" in caplog.messages
    with pytest.raises(SelfAlignError, match=r"^dpo: W was killed by signal 9; its output is in the log$"):
        launcher_module.run_logged([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], "dpo", "dpo: W")


# a child that starts a worker of its own, prints its pid and waits: the worker stands for accelerate's trainers
CHILD_WITH_A_WORKER = (
    "import subprocess, sys, time\n"
    "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('worker', worker.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def stop_at_the_workers_line(monkeypatch, stop) -> list[int]:
    """Call `stop()` in the run's process when the child's "worker PID" line is logged; returns the workers' pids."""
    workers = []

    class StopAtTheWorkersLine:
        def info(self, message, *args):
            if len(args) == 2 and args[1].startswith("worker "):
                workers.append(int(args[1].split()[1]))
                stop()

    monkeypatch.setattr(launcher_module, "logger", StopAtTheWorkersLine())
    return workers


def test_an_interrupted_run_stops_the_child_and_what_the_child_started(monkeypatch):
    def interrupt():
        raise KeyboardInterrupt

    workers = stop_at_the_workers_line(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        launcher_module.run_logged([sys.executable, "-c", CHILD_WITH_A_WORKER], "sft", "sft: W")
    assert workers and not process_alive(workers[0])


def test_sigterm_to_the_run_stops_the_child_and_what_the_child_started(monkeypatch):
    """A job scheduler's stop (SIGTERM), not a Python exception, would end the run's process at once and leave the
    trainers running into a stage folder whose lock is gone: it stops the child's whole session first."""
    workers = stop_at_the_workers_line(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        launcher_module.run_logged([sys.executable, "-c", CHILD_WITH_A_WORKER], "sft", "sft: W")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert workers and not process_alive(workers[0])
    assert signal.getsignal(signal.SIGTERM) is previous  # the run's own handlers are back


def process_alive(pid: int, seconds: float = 10.0) -> bool:
    """Whether `pid` still runs (a zombie, ended but not yet reaped by its new parent, counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def fake_accelerate(monkeypatch, script: str) -> None:
    """Run SCRIPT instead of accelerate's launcher; it receives the launcher's arguments as sys.argv[1:]."""
    monkeypatch.setattr(launcher_module, "ACCELERATE_LAUNCH", (sys.executable, "-c", script))


def test_the_stage_launches_selfalign_train_on_its_config_and_data(tmp_path, ran, monkeypatch, caplog):
    fake_accelerate(monkeypatch, "import sys; print('argv', *sys.argv[1:])")
    config = demo(tmp_path, launch_with(CPU_2PROC, 2), "training.dpo=false", "training.dpo_from_sft=false")
    with caplog.at_level("INFO", logger="selfalign.pipeline.launcher"):
        with pytest.raises(SelfAlignError) as error:
            run_pipeline(config)
    sft = next((tmp_path / "run" / "sft").iterdir())
    preferences = next((tmp_path / "run" / "preferences").iterdir())
    argv = next(message for message in caplog.messages if message.startswith("sft | argv "))
    assert argv.split()[3:] == [
        "--config_file", str(SHIPPED_CONFIGS / "accelerate" / "cpu-2proc.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "-m", "selfalign", "train", "sft", "--config", str(sft / "training.yaml"),
        "--data", str(preferences / "dataset" / "train.jsonl"), "--out", str(sft / "training"),
    ]  # fmt: skip
    assert str(error.value) == (
        f"sft: accelerate launch with {SHIPPED_CONFIGS / 'accelerate' / 'cpu-2proc.yaml'} (2 processes) exited 0 but "
        f"wrote no adapter_config.json or metrics.json to {sft / 'training'}"
    )
    recorded = yaml.safe_load((sft / "training.yaml").read_text())
    assert recorded["seed"] == config.seed and recorded["preset"] == config.training.preset


def test_a_failing_child_fails_its_stage_and_keeps_what_ran_before(tmp_path, ran, monkeypatch):
    fake_accelerate(monkeypatch, "import sys; print('error: out of memory', file=sys.stderr); sys.exit(1)")
    with pytest.raises(SelfAlignError, match=r"exited with status 1 \(error: out of memory\)$"):
        run_pipeline(demo(tmp_path, LAUNCH_CPU))
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["failed_stage"] == "sft"
    assert manifest["error"] == (
        f"sft: accelerate launch with {SHIPPED_CONFIGS / 'accelerate' / 'cpu-2proc.yaml'} (2 processes) exited with "
        "status 1 (error: out of memory)"
    )
    assert ran == ["tune-judge", "preferences"]
    assert "output_hash" in manifest["stages"]["preferences"] and "output_hash" not in manifest["stages"]["sft"]
    ran.clear()
    with pytest.raises(SelfAlignError):
        run_pipeline(demo(tmp_path, LAUNCH_CPU))
    assert ran == []  # tune-judge and preferences stayed cached


# ---- the real thing: two CPU processes per training stage --------------------------------------------------------


@pytest.mark.slow  # about a minute on 2 cores: two launches of two processes, each importing torch and TRL
def test_run_trains_sft_and_dpo_under_accelerate_in_two_processes(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each process its share of the 2 cores
    monkeypatch.setattr(launcher_module, "available_cores", lambda: 2)
    config = {
        "out": str(tmp_path / "run"),
        "model": {
            "model": str(tiny_model_dir), "backend": "scripted", "prompt_format": "plain",
            "options": {
                "rules": [["Rewrite the reply", "It would hurt people, so please do not do this."],
                          ["Refuse the following request", "Please ask me something else."]],
                "default": "Here is a complete answer.",
            },
        },
        "tune_judge": None,
        "judge": {"design": "rule"},
        "preferences": {
            "prompts": [{"data": "builtin:redteam:train", "source": "harmful", "limit": 6},
                        {"data": "builtin:helpful:train", "source": "benign", "limit": 6}],
            "eval_fraction": 0.3,
        },
        "training": {
            "preset": "cpu-small", "dpo_from_sft": True,
            "settings": {"max_steps": 2, "batch_size": 2, "max_length": 384, "progress_bar": False},
            "launcher": {"accelerate": CPU_2PROC},
        },
        "evaluation": {"limit": 4, "generation": {"max_new_tokens": 16}, "bootstrap_samples": 100},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with caplog.at_level("INFO"):
        _, manifest = run_pipeline(load_run_config(tmp_path / "run.yaml"))
    assert manifest["status"] == "completed"
    for stage in ("sft", "dpo"):
        adapter = Path(manifest["outputs"][stage]) / stages_module.ADAPTER
        assert (adapter / "adapter_model.safetensors").is_file()
        metrics = json.loads((adapter / "metrics.json").read_text())
        assert metrics["train"]["processes"] == 2 and metrics["train"]["steps"] == 2  # two ranks, DDP over gloo
        assert manifest["stages"][stage]["tokens"]["trained"] > 0  # read from the child's metrics.json
        record = json.loads((Path(manifest["outputs"][stage]) / "stage.json").read_text())
        assert record["settings"]["processes"] == 2
    assert metrics["reference_model"] == "frozen copy of the SFT adapter (PEFT adapter 'ref')"  # DPO after SFT
    logged = "\n".join(caplog.messages)
    assert "sft | wrote the SFT adapter to" in logged and "dpo | wrote the DPO adapter to" in logged
    _, again = run_pipeline(load_run_config(tmp_path / "run.yaml"))
    assert not any(stage["ran"] for stage in again["stages"].values())
