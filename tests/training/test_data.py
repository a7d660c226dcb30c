"""Preference data for training: loading, the eval split, and formatting with the generation prompt format."""

import datasets
import pytest
from transformers import AutoTokenizer

from selfalign.errors import SelfAlignError
from selfalign.models.formats import get_prompt_format
from selfalign.training.data import check_prompts_fit, dpo_examples, load_pairs, sft_examples, split_pairs
from tests.training.conftest import make_pairs, write_pairs


@pytest.fixture(scope="module")
def plain_format(tiny_model_dir):
    return get_prompt_format(AutoTokenizer.from_pretrained(tiny_model_dir), "plain")


def test_sft_examples_are_rendered_by_the_generation_format(plain_format, tmp_path):
    pairs = load_pairs(str(write_pairs(tmp_path / "p.jsonl", make_pairs(4))))
    examples = sft_examples(pairs, plain_format, "p.jsonl", system_prompt="Be kind.")
    assert examples.column_names == ["prompt", "completion"]
    assert examples[0]["prompt"] == plain_format.render_prompt(pairs[0]["prompt"], "Be kind.")
    assert examples[0]["completion"] == plain_format.render_completion(pairs[0]["chosen"])
    assert examples[0]["completion"].endswith("<eos>")  # so TRL adds no second EOS
    assert len(sft_examples(pairs, plain_format, "p.jsonl", pair_types=("refusal",))) == 2  # refusal pairs only


def test_each_method_trains_on_the_pair_types_its_section_asks_for(plain_format, tmp_path):
    from selfalign.training.config import load_training_config

    pairs = load_pairs(str(write_pairs(tmp_path / "p.jsonl", make_pairs(4))))  # 2 refusal, 2 helpful
    config = load_training_config(None, ["sft.include_refusal=false", "dpo.include_helpful=false"])
    assert (config.sft.pair_types, config.dpo.pair_types) == (("helpful",), ("refusal",))
    sft = sft_examples(pairs, plain_format, "p.jsonl", pair_types=config.sft.pair_types)
    dpo = dpo_examples(pairs, plain_format, "p.jsonl", pair_types=config.dpo.pair_types)
    helpful = [plain_format.render_completion(row["chosen"]) for row in pairs if row["pair_type"] == "helpful"]
    assert sft["completion"] == helpful
    refusal = [plain_format.render_completion(row["chosen"]) for row in pairs if row["pair_type"] == "refusal"]
    assert dpo["chosen"] == refusal
    with pytest.raises(SelfAlignError, match=r"no DPO examples left after formatting \(2 refusal pairs left out"):
        dpo_examples(pairs, plain_format, "p.jsonl", pair_types=())
    with pytest.raises(SelfAlignError, match="sft: include_refusal and include_helpful are both false"):
        load_training_config(None, ["sft.include_refusal=false", "sft.include_helpful=false"])


def test_dpo_examples_keep_pairs_with_something_to_prefer(plain_format, tmp_path):
    rows = make_pairs(4)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["rejected"] = "  "
    pairs = load_pairs(str(write_pairs(tmp_path / "p.jsonl", rows)))
    examples = dpo_examples(pairs, plain_format, "p.jsonl")
    assert examples.column_names == ["prompt", "chosen", "rejected"]
    assert len(examples) == 2
    assert examples[0]["rejected"] == plain_format.render_completion(rows[0]["rejected"])


def test_data_empty_after_formatting_is_an_error_naming_file_and_field(plain_format, tmp_path):
    rows = [{**row, "chosen": " "} for row in make_pairs(3)]
    pairs = load_pairs(str(write_pairs(tmp_path / "p.jsonl", rows)))
    with pytest.raises(SelfAlignError, match=r"p.jsonl: no SFT examples left after formatting \(3 empty 'prompt' or "):
        sft_examples(pairs, plain_format, "p.jsonl")
    with pytest.raises(SelfAlignError, match="no DPO examples left after formatting"):
        dpo_examples(pairs, plain_format, "p.jsonl")


def test_prompts_that_fill_max_length_leave_nothing_to_train_on(plain_format, tmp_path):
    pairs = load_pairs(str(write_pairs(tmp_path / "p.jsonl", make_pairs(4))))
    examples = sft_examples(pairs, plain_format, "p.jsonl")
    assert check_prompts_fit(examples, plain_format, 512, "p.jsonl", "SFT") == 0
    with pytest.raises(SelfAlignError, match="p.jsonl: every SFT prompt is at least max_length=4 tokens long"):
        check_prompts_fit(examples, plain_format, 4, "p.jsonl", "SFT")


def test_a_save_to_disk_folder_is_accepted_and_checked(tmp_path):
    datasets.Dataset.from_list(make_pairs(4)).save_to_disk(str(tmp_path / "pairs"))
    assert len(load_pairs(str(tmp_path / "pairs"))) == 4
    datasets.Dataset.from_list([{"prompt": "a", "answer": "b"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(SelfAlignError, match="bad: no column 'chosen'; columns present: prompt, answer"):
        load_pairs(str(tmp_path / "bad"))
    with pytest.raises(SelfAlignError, match="not one written by datasets' save_to_disk"):
        load_pairs(str(tmp_path))


def test_missing_columns_in_a_file_are_named(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(SelfAlignError, match="no column 'rejected'"):
        load_pairs(str(path))


def test_the_eval_split_is_seeded_and_disjoint(tmp_path):
    pairs = load_pairs(str(write_pairs(tmp_path / "p.jsonl", make_pairs(16))))
    train, held_out = split_pairs(pairs, 0.25, seed=1)
    again, _ = split_pairs(pairs, 0.25, seed=1)
    assert (len(train), len(held_out)) == (12, 4)
    assert train["prompt"] == again["prompt"]
    assert not set(train["prompt"]) & set(held_out["prompt"])
    assert split_pairs(pairs, 0.0, seed=1)[1] is None
