"""One way to tell whether earlier work answers the current settings, for run stages and preference sub-stages."""

import hashlib
import json

import pytest

from selfalign.errors import SelfAlignError
from selfalign.stage_settings import changed_settings, check_settings, settings_key


def test_a_key_is_the_hash_existing_run_folders_are_named_by():
    settings = {"stage": "dpo", "settings": {"beta": 0.1, "path": None}, "inputs": {"preferences": "ab12"}}
    text = json.dumps(settings, sort_keys=True, default=str)  # what named every stage folder so far
    assert settings_key(settings) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert settings_key({"b": 1, "a": (1, 2)}) == settings_key({"a": [1, 2], "b": 1})


def test_changed_settings_are_the_top_level_keys_that_differ_as_json():
    stored = {"seed": 0, "generation": {"max_new_tokens": 8}, "prompts": [1, 2], "gone": True}
    current = {"seed": 0, "generation": {"max_new_tokens": 9}, "prompts": (1, 2), "new": 1}
    assert changed_settings(stored, current) == ["generation", "gone", "new"]


def test_settings_are_stored_on_first_use_and_other_settings_are_refused(tmp_path):
    rows, record = tmp_path / "rows.jsonl", tmp_path / "rows.settings.json"
    check_settings(rows, {"seed": 0}, record, "use another --out")
    assert json.loads(record.read_text()) == {"seed": 0}
    rows.write_text('{"key": "a"}\n')
    check_settings(rows, {"seed": 0}, record, "use another --out")  # same settings: go on
    with pytest.raises(SelfAlignError, match=r"rows.jsonl was made with other settings \(changed: seed\); use another"):
        check_settings(rows, {"seed": 1}, record, "use another --out")
    rows.unlink()  # nothing made yet: the new settings are recorded
    check_settings(rows, {"seed": 1}, record, "use another --out")
    assert json.loads(record.read_text()) == {"seed": 1}
