import pytest
from pydantic import Field

from selfalign.config import StrictModel, apply_overrides, load_config, read_yaml_mapping
from selfalign.errors import SelfAlignError


class Judge(StrictModel):
    mode: str = "generate"
    threshold: float = 0.5


class RunConfig(StrictModel):
    model: str = "embedded:gemma-3-270m"
    seed: int = Field(0, ge=0)
    judge: Judge = Field(default_factory=Judge)


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "seed: 3\njudge:\n  mode: logprob\n")
    config = load_config(RunConfig, path, ["judge.threshold=0.25", "seed=4"])
    assert (config.model, config.seed, config.judge.mode, config.judge.threshold) == (
        "embedded:gemma-3-270m",
        4,
        "logprob",
        0.25,
    )


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "judge:\n  mdoe: logprob\n")
    with pytest.raises(SelfAlignError, match=rf"{path}: unknown key 'judge.mdoe'"):
        load_config(RunConfig, path)


def test_unknown_override_key_is_an_error(tmp_path):
    with pytest.raises(SelfAlignError, match="unknown key 'judge.temp'"):
        load_config(RunConfig, None, ["judge.temp=1"])


def test_duplicate_keys_are_errors_with_the_line(tmp_path):
    path = write(tmp_path, "seed: 1\nmodel: a/b\nseed: 2\n")
    with pytest.raises(SelfAlignError, match=r"run.yaml:3: invalid YAML: duplicate key 'seed' \(first on line 1\)"):
        read_yaml_mapping(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(SelfAlignError, match="top level must be a mapping"):
        read_yaml_mapping(write(tmp_path, "- a\n- b\n"))


def test_invalid_value_names_the_key(tmp_path):
    with pytest.raises(SelfAlignError, match="invalid value for 'seed'"):
        load_config(RunConfig, write(tmp_path, "seed: -1\n"))


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(SelfAlignError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    with pytest.raises(SelfAlignError, match="expected key=value"):
        apply_overrides({}, ["judge.mode"])
    with pytest.raises(SelfAlignError, match="'model' is a value, not a section"):
        apply_overrides({"model": "x"}, ["model.name=y"])


def test_override_values_are_read_as_yaml():
    data = apply_overrides({}, ["a.list=[1, 2]", "a.none=null", "a.text=hello world", "a.flag=true"])
    assert data == {"a": {"list": [1, 2], "none": None, "text": "hello world", "flag": True}}


def test_overrides_index_into_lists():
    data = {"prompts": [{"limit": 1}, {"limit": 2}]}
    assert apply_overrides(data, ["prompts.1.limit=5"])["prompts"][1]["limit"] == 5
    with pytest.raises(SelfAlignError, match="'7' is not an index of a list of 2 items"):
        apply_overrides(data, ["prompts.7.limit=5"])
