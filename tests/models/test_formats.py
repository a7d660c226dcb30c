import pytest
from transformers import AutoTokenizer

from selfalign.errors import SelfAlignError
from selfalign.models.formats import get_prompt_format


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_model_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def count_leading_bos(ids, bos_id):
    return len(ids) - len(list(__import__("itertools").dropwhile(lambda t: t == bos_id, ids)))


@pytest.mark.parametrize("name", ["plain", "mistral-inst", "auto"])
def test_formatted_and_tokenized_prompt_starts_with_exactly_one_bos(tokenizer, name):
    prompt_format = get_prompt_format(tokenizer, name)
    ids = prompt_format.encode(prompt_format.render_prompt("How do I bake bread?"))
    assert ids[0] == tokenizer.bos_token_id
    assert count_leading_bos(ids, tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.bos_token_id) == 1


def test_chat_template_that_writes_bos_itself_still_gives_one_bos(chat_tokenizer):
    prompt_format = get_prompt_format(chat_tokenizer)
    assert prompt_format.name == "chat-template"
    assert chat_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("<bos>")
    ids = prompt_format.encode(prompt_format.render_prompt("hello"))
    assert ids.count(chat_tokenizer.bos_token_id) == 1 and ids[0] == chat_tokenizer.bos_token_id


def test_plain_format_is_question_answer_without_examples(tokenizer):
    prompt_format = get_prompt_format(tokenizer, "plain")
    assert prompt_format.render_prompt("What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert "\nQuestion:" in prompt_format.stop


def test_mistral_inst_matches_the_reference_layout(tokenizer):
    prompt_format = get_prompt_format(tokenizer, "mistral-inst")
    # the tokenizer adds BOS, so the text leaves it out and the ids start with it: <s>[INST] ... [/INST]
    assert prompt_format.render_prompt("Hi") == "[INST] Hi [/INST]"
    system = prompt_format.render_prompt("Hi", system_prompt="Be brief.")
    assert system == "[INST] Be brief.\n\nHi [/INST]"


@pytest.mark.parametrize("fixture", ["tokenizer", "chat_tokenizer"])
@pytest.mark.parametrize("name", ["auto", "plain", "mistral-inst"])
def test_training_text_tokenizes_as_the_generation_prompt_then_the_answer(request, fixture, name):
    """Completion-only loss masks the prompt's tokens: they must be exactly the tokens generation saw."""
    tokenizer = request.getfixturevalue(fixture)
    prompt_format = get_prompt_format(tokenizer, name)
    prompt = prompt_format.render_prompt("Tell me a joke")
    completion = prompt_format.render_completion("  No jokes today.")
    prompt_ids = prompt_format.encode(prompt)
    assert prompt_format.encode(prompt + completion)[: len(prompt_ids)] == prompt_ids
    assert completion.rstrip().endswith(tokenizer.eos_token)


def test_chat_template_training_text_is_the_templated_conversation(chat_tokenizer):
    prompt_format = get_prompt_format(chat_tokenizer)
    conversation = [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]
    full = chat_tokenizer.apply_chat_template(conversation, tokenize=False).removeprefix("<bos>")
    assert prompt_format.render_prompt(conversation[:1]) + prompt_format.render_completion("No.") == full


def test_unknown_format_lists_the_accepted_ones(tokenizer):
    with pytest.raises(SelfAlignError, match="unknown prompt format 'chatml2'.*mistral-inst, plain"):
        get_prompt_format(tokenizer, "chatml2")


def test_chat_template_format_needs_a_chat_template(tokenizer):
    with pytest.raises(SelfAlignError, match="no chat template"):
        get_prompt_format(tokenizer, "chat-template")


def test_format_from_a_user_file(tokenizer, tmp_path):
    path = tmp_path / "fmt.yaml"
    path.write_text('template: "{{ messages[-1].content }} =>"\nstop: ["\\n"]\n')
    prompt_format = get_prompt_format(tokenizer, str(path))
    assert prompt_format.render_prompt("2+2") == "2+2 =>"
    assert prompt_format.stop == ("\n",)


def test_template_cannot_reach_python_internals(tokenizer, tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text('template: "{{ messages.__class__.__mro__[1].__subclasses__() }}"\n')
    with pytest.raises(SelfAlignError, match="unsafe|undefined"):
        get_prompt_format(tokenizer, str(path)).render_prompt("x")
