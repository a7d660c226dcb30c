import pytest

from selfalign.errors import SelfAlignError
from selfalign.judging.templates import builtin_template_names, load_template


def test_every_shipped_template_loads_and_shows_the_response():
    names = builtin_template_names()
    assert {"one-shot", "four-shot", "reason-first", "four-shot-no-reason", "zero-shot", "taxonomy", "complies"} <= set(
        names
    )
    for name in names:
        template = load_template(name)
        prompt = template.render("How do I pick a lock?", "UNIQUE-RESPONSE-TEXT 42", categories={"theft": "stealing"})
        assert "UNIQUE-RESPONSE-TEXT 42" in prompt
        assert "How do I pick a lock?" in prompt


def test_no_reason_template_stops_right_after_the_verdict():
    template = load_template("four-shot-no-reason")
    assert template.reasoning == "none"
    assert template.max_new_tokens <= 3 and "\n" in template.stop


def test_reason_first_is_generate_only():
    assert load_template("reason-first").modes == ["generate"]


def test_taxonomy_template_lists_every_hazard_category():
    from selfalign.data.loading import builtin_sets

    categories = builtin_sets()["redteam"].values
    prompt = load_template("taxonomy").render("q", "r", categories=categories)
    assert all(name in prompt for name in categories)


def write(tmp_path, text, name="judge.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_template_without_placeholders_is_refused(tmp_path):
    # the reference's preference notebook: the template lost {request}/{response}, so the judge saw no answer
    path = write(tmp_path, "prompt: 'Is this harmful? Answer with #answer: 1 or 0.'\n")
    with pytest.raises(
        SelfAlignError, match=r"judge.yaml: the prompt never uses \{\{ request \}\}, \{\{ response \}\}"
    ):
        load_template(str(path))


def test_user_template_file_is_used(tmp_path):
    path = write(tmp_path, "prompt: 'Q: {{ request }} A: {{ response }} harmful?'\nmax_new_tokens: 4\n", "mine.yaml")
    template = load_template(str(path))
    assert template.name == "mine" and template.render("x", "y") == "Q: x A: y harmful?"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt: '{{ request }} {{ response }}'\nverdict: toxic\n", "invalid value for 'verdict'"),
        ("prompt: '{{ request }} {{ response }}'\ncolour: red\n", "unknown key 'colour'"),
        ("- a list\n", "a judge template is a mapping"),
        ("prompt: '{{ request }} {{ response }'\n", "template syntax error"),
        ("prompt: '{{ request }} {{ response }}'\nreasoning: before\n", "cannot be used in logprob mode"),
    ],
)
def test_bad_template_files_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text, f"bad{abs(hash(text))}.yaml")
    with pytest.raises(SelfAlignError, match=message) as info:
        load_template(str(path))
    assert str(path) in str(info.value)


def test_unknown_template_lists_the_shipped_ones():
    with pytest.raises(SelfAlignError, match="unknown judge template 'eight-shot'; built-in: complies"):
        load_template("eight-shot")


def test_template_reaching_python_internals_fails_cleanly(tmp_path):
    path = write(tmp_path, "prompt: '{{ request.__class__.__mro__ }} {{ response }}'\n", "evil.yaml")
    with pytest.raises(SelfAlignError, match="unsafe|undefined"):
        load_template(str(path)).render("x", "y")
