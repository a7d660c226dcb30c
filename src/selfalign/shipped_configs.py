"""The config files shipped inside the package (selfalign/configs/), by name: `demo`, `training/embedded-cpu`.

They are package data, so `pip install selfalign` has them without a checkout; in a checkout, `configs/` at the
root is a link to the same folder, so the README's `configs/...` paths name these very files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selfalign.errors import SelfAlignError

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
# the folder a copy goes to by default: the files' own comments and the README run them as configs/NAME.yaml
COPY_FOLDER = Path("configs")
# comment lines that give a command to run, not a description (each file's header starts with its command)
COMMAND_PREFIXES = ("selfalign ", "accelerate ")
DESCRIPTION_CHARS = 160


def shipped_names() -> list[str]:
    """Every shipped config's name: its path under the folder, without `.yaml`, with `/` between folders."""
    return sorted(path.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix() for path in _shipped_files())


def _shipped_files() -> list[Path]:
    return [path for path in SHIPPED_CONFIGS.rglob("*.yaml") if path.is_file()]


def shipped_config(name: str) -> Path:
    """The file of a shipped config; `demo`, `demo.yaml` and `configs/demo.yaml` all name the same one."""
    key = name.strip().removeprefix("configs/").removesuffix(".yaml")
    if key in shipped_names():
        return SHIPPED_CONFIGS / f"{key}.yaml"
    raise SelfAlignError(f"no shipped config named '{name}'; shipped configs: {', '.join(shipped_names())}")


def find_config_file(name: str) -> Path:
    """A config file that a config names: the path as given (from the current folder) when that file exists, else
    the shipped config of that name (`configs/accelerate/ddp.yaml`, `accelerate/ddp`), so that a run config names
    shipped files the same way in a checkout and in an installed package."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    try:
        return shipped_config(name)
    except SelfAlignError:
        raise SelfAlignError(f"{name}: no such file here, nor a shipped config (`selfalign configs list`)") from None


def describe(path: Path) -> str:
    """One line about a config from its header comment: the first sentence of the first comment line that is not
    a command; cut to its first clause (before ': ') when that sentence is long."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.startswith("  ") or text.strip().startswith(COMMAND_PREFIXES):  # indented lines are commands too
            if lines:
                break
            continue
        lines.append(text.strip())
    paragraph = " ".join(lines)
    sentence = paragraph.split(". ", 1)[0].rstrip(".")
    if len(sentence) > DESCRIPTION_CHARS and ": " in sentence:
        sentence = sentence.split(": ", 1)[0]
    if len(sentence) > DESCRIPTION_CHARS:
        sentence = sentence[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
    return sentence


def describe_shipped() -> list[tuple[str, str]]:
    """(name, description) of every shipped config, by name."""
    return [(name, describe(SHIPPED_CONFIGS / f"{name}.yaml")) for name in shipped_names()]


def copy_shipped(name: str, dest: Path | None = None, force: bool = False) -> Path:
    """Copy a shipped config to an editable file and return its path. The default is configs/NAME.yaml under the
    current folder, so the commands in the file's own header comment work as written; a folder as `dest` gets a
    file of the config's own name. An existing file is only replaced with `force`."""
    source = shipped_config(name)
    target = COPY_FOLDER / source.relative_to(SHIPPED_CONFIGS) if dest is None else dest
    if target.is_dir():
        target = target / source.name
    if target.exists() and target.resolve() == source.resolve():
        # in a checkout, configs/ is the shipped folder itself: "copying" would edit the package's own file
        raise SelfAlignError(f"{target} is the shipped config itself (a source checkout); edit it there or copy "
                             "it elsewhere: selfalign configs copy NAME DEST")  # fmt: skip
    if target.exists() and not force:
        raise SelfAlignError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
