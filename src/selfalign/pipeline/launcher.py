"""`training.launcher`: the run's SFT and DPO stages train in a child `accelerate launch -m selfalign train ...`.

The child is accelerate's own launcher CLI (`python -m accelerate.commands.launch`), the command that the files in
configs/accelerate/ give, run on the stage's recorded training config (`training.yaml`) and data; it writes the
adapter into the stage folder as an in-process run would, so resume, outputs and metrics stay the same. Its output
goes line by line to the run's log. What the file asks for is checked before any stage runs: the file and its
process count when the run config loads, the devices on this machine in the run's preflight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from selfalign.config import StrictModel, read_yaml_mapping
from selfalign.errors import SelfAlignError
from selfalign.shipped_configs import find_config_file

logger = logging.getLogger(__name__)

ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch")
# accelerate's types that place one process per CUDA GPU (use_cpu: false), and those that place them on CPU cores
GPU_TYPES = {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED", "MEGATRON_LM"}
CPU_TYPES = {"MULTI_CPU"}
STOP_SECONDS = 30  # how long a stopped child gets to end its processes before it is killed


class LauncherSettings(StrictModel):
    """`training.launcher`: train the SFT and DPO stages under `accelerate launch` with this config file."""

    accelerate: str = Field(
        description="An accelerate config file: a path from the current folder, or a shipped one by its name "
        "(configs/accelerate/ddp.yaml, accelerate/fsdp)."
    )
    num_processes: int | None = Field(
        None, ge=1, description="Processes, overriding the file's num_processes (accelerate's --num_processes)."
    )

    _config_file: Path | None = PrivateAttr(None)
    _file_processes: int | None = PrivateAttr(None)

    @field_validator("accelerate")
    @classmethod
    def _file_exists(cls, value: str) -> str:
        try:
            find_config_file(value)
        except SelfAlignError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _read_the_file(self) -> LauncherSettings:
        path = find_config_file(self.accelerate)
        try:
            data = read_yaml_mapping(path)
        except SelfAlignError as exc:
            raise ValueError(str(exc)) from None
        if "distributed_type" not in data:
            raise ValueError(f"{path}: not an accelerate config (no distributed_type)")
        if data.get("num_machines", 1) != 1:
            raise ValueError(
                f"{path}: num_machines {data['num_machines']}: `selfalign run` launches training on its own machine "
                "only; on several machines run `accelerate launch ... -m selfalign train` on each (docs/scaling.md)"
            )
        file_processes = data.get("num_processes")
        if self.num_processes is None and not (isinstance(file_processes, int) and file_processes >= 1):
            raise ValueError(f"{path}: num_processes {file_processes} is no process count; set num_processes here")
        self._config_file, self._file_processes = path, file_processes
        return self

    @property
    def config_file(self) -> Path:
        assert self._config_file is not None  # set by the validator above
        return self._config_file

    @property
    def processes(self) -> int:
        """The processes training runs in: this setting's, else the file's."""
        return self.num_processes or self._file_processes or 1


# ---- before any stage: are there devices for every process? --------------------------------------------------


def check_devices(launcher: LauncherSettings) -> None:
    """Fail in one line when this machine has fewer devices than the launch has processes: GPUs (CUDA devices
    visible, and among `gpu_ids`) for a GPU type, cores this process may use for a CPU one (`use_cpu: true`), where
    more processes than cores would only take turns on the same cores. Other types (TPU, XPU, NPU, ...) are left to
    accelerate. The file is also read by accelerate's own loader here, so that a key it refuses stops the run now."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    where = f"training.launcher: {launcher.config_file}"
    try:
        cluster = load_config_from_file(str(launcher.config_file))
    except (ValueError, TypeError, KeyError) as exc:
        raise SelfAlignError(f"{where}: accelerate cannot read it: {' '.join(str(exc).split())}") from None
    if not isinstance(cluster, ClusterConfig):
        return  # SageMaker: the processes run elsewhere
    processes = launcher.processes
    kind = getattr(cluster.distributed_type, "value", cluster.distributed_type)
    if cluster.use_cpu or kind in CPU_TYPES:
        cores = available_cores()
        if processes > cores:
            raise SelfAlignError(f"{where}: {processes} CPU processes, but this process may use {cores} cores; set "
                                 f"training.launcher.num_processes to at most {cores}")  # fmt: skip
    elif kind in GPU_TYPES and (kind != "NO" or processes > 1):
        gpus = visible_gpus(cluster.gpu_ids)
        if processes > gpus:
            fix = f"set training.launcher.num_processes to at most {gpus}" if gpus else "train without a launcher"
            raise SelfAlignError(f"{where}: {processes} processes of type {kind}, one per GPU, but {gpus} GPUs are "
                                 f"visible here; {fix}")  # fmt: skip


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus(gpu_ids: Any) -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies), and no more than the file's `gpu_ids` list."""
    import torch

    count = torch.cuda.device_count()
    if gpu_ids in (None, "all", ""):
        return count
    return min(count, len([part for part in str(gpu_ids).split(",") if part.strip()]))


# ---- the launch ------------------------------------------------------------------------------------------------


MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}  # training dtype -> accelerate's name


def launch_command(launcher: LauncherSettings, selfalign_arguments: list[str], dtype: str | None = None) -> list[str]:
    """`accelerate launch --config_file F [--num_processes N] [--mixed_precision P] -m selfalign ARGUMENTS`, with this
    Python. `dtype` (the training config's resolved dtype) overrides the file's `mixed_precision`: the shipped GPU files
    say bf16, and a child left with it would train under autocast where the same stage in-process trains in fp32,
    with the same stage key."""
    command = [*ACCELERATE_LAUNCH, "--config_file", str(launcher.config_file)]
    if launcher.num_processes is not None:
        command += ["--num_processes", str(launcher.num_processes)]
    if dtype is not None:
        command += ["--mixed_precision", MIXED_PRECISION[dtype]]
    return [*command, "-m", "selfalign", *selfalign_arguments]


def launch_training(
    launcher: LauncherSettings, kind: str, training_file: Path, data: str, out: Path, dtype: str | None = None
) -> None:
    """`selfalign train KIND --config TRAINING_FILE --data DATA --out OUT` under accelerate, in `dtype`; the adapter
    it wrote must be in OUT afterwards."""
    arguments = ["train", kind, "--config", str(training_file), "--data", data, "--out", str(out)]
    what = f"{kind}: accelerate launch with {launcher.config_file} ({launcher.processes} processes)"
    run_logged(launch_command(launcher, arguments, dtype), kind, what)
    missing = [name for name in ("adapter_config.json", "metrics.json") if not (out / name).is_file()]
    if missing:
        raise SelfAlignError(f"{what} exited 0 but wrote no {' or '.join(missing)} to {out}")


def run_logged(command: list[str], prefix: str, what: str) -> None:
    """Run `command`, logging each line it prints (stdout and stderr) as `PREFIX | line`; a non-zero exit raises one
    line naming `what`, the status and the child's last `error: ...` line. The child runs in a session of its own,
    so that an interrupted run stops every process it started (launcher and trainers alike): on an exception, and on
    SIGTERM or SIGHUP (a job scheduler's stop, `timeout`, a closed terminal), which would otherwise end this process
    and leave the trainers running, writing into a stage folder whose lock is gone."""
    logger.info("%s: %s", prefix, shlex.join(command))
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive as they are printed, not per 8 KB
    last_error = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=environment,
        start_new_session=True,
    ) as child, _stop_signals_raise():  # fmt: skip
        try:
            assert child.stdout is not None
            for line in child.stdout:  # text mode splits progress bars' carriage returns into lines too
                line = line.rstrip()
                if line:
                    logger.info("%s | %s", prefix, line)
                if line.startswith("error: "):
                    last_error = line
            status = child.wait()
        except BaseException:
            stop_session(child)
            raise
    if status != 0:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        raise SelfAlignError(f"{what} {how}" + (f" ({last_error})" if last_error else "; its output is in the log"))


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread, so that the `except`
    around the child stops its session; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a run in another thread keeps the default ones
        return

    def exit_on(number: int, frame: Any) -> None:
        raise SystemExit(128 + number)

    previous = {number: signal.signal(number, exit_on) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_session(child: subprocess.Popen) -> None:
    """SIGTERM to the child's session (it leads it), SIGKILL to whatever of it is left after STOP_SECONDS."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=STOP_SECONDS)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
