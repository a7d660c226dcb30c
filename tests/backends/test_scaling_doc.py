"""docs/scaling.md's config examples stay valid: every YAML block is a run config whose backend options parse."""

import re
from pathlib import Path

import yaml

from selfalign.backends.openai_backend import OpenAIOptions
from selfalign.backends.vllm_backend import VLLMOptions
from selfalign.pipeline.config import RunConfig

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
OPTIONS = {"openai": OpenAIOptions, "vllm": VLLMOptions}


def test_every_yaml_block_of_the_scaling_guide_is_a_valid_model_section():
    blocks = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        config = RunConfig.model_validate(yaml.safe_load(block))
        OPTIONS[config.model.backend].model_validate(config.model.options)
