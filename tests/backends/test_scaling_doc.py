"""The docs' config examples stay valid: every YAML block of docs/scaling.md and the README is a run config whose
backend options parse."""

import re
from pathlib import Path

import yaml

from selfalign.backends.openai_backend import OpenAIOptions
from selfalign.backends.vllm_backend import VLLMOptions
from selfalign.pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
GUIDES = (ROOT / "docs" / "scaling.md", ROOT / "README.md")
OPTIONS = {"openai": OpenAIOptions, "vllm": VLLMOptions}


def test_every_yaml_block_of_the_docs_is_a_valid_model_section():
    blocks = [block for guide in GUIDES for block in re.findall(r"```yaml\n(.*?)```", guide.read_text("utf-8"), re.S)]
    assert len(blocks) >= 3
    for block in blocks:
        config = RunConfig.model_validate(yaml.safe_load(block))
        OPTIONS[config.model.backend].model_validate(config.model.options)
