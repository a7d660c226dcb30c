import math

import pytest
import torch

from selfalign.backends.base import GenerationParams
from selfalign.backends.transformers_backend import PREPACKED, TransformersBackend, create_transformers_backend
from selfalign.models.loading import load_model

PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "Hi",
    "Write a short poem about the rain falling on the roof at night, please, and make it rhyme.",
    "How do I kill a Python process?",
    "0 1 2",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture
def backend(loaded):
    return TransformersBackend(loaded.model, loaded.tokenizer, batch_size=2, show_progress=False)


def reference_greedy(loaded, prompt: str, max_new_tokens: int) -> list[int]:
    """One prompt at a time through `model.generate`: the ground truth for batched, sorted, row-dropping decoding."""
    encoded = loaded.tokenizer(prompt, return_tensors="pt")
    output = loaded.model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
    )
    tokens = output[0, encoded["input_ids"].shape[1] :].tolist()
    eos = loaded.tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_greedy_generation_matches_unbatched_generate_in_input_order(loaded, backend):
    completions = backend.generate(PROMPTS, GenerationParams(max_new_tokens=12))
    assert len(completions) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, completions):
        expected = reference_greedy(loaded, prompt, 12)
        assert completion.text == loaded.tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert completion.completion_tokens == len(expected)
        assert completion.prompt_tokens == len(loaded.tokenizer(prompt)["input_ids"])
        assert completion.finish_reason == ("length" if len(expected) == 12 else "stop")


def test_stop_string_truncates_and_counts_only_kept_tokens(loaded, backend):
    full = backend.generate(PROMPTS[:1], GenerationParams(max_new_tokens=16))[0]
    assert len(full.text) > 3
    stop = full.text[2:4]
    stopped = backend.generate(PROMPTS[:1], GenerationParams(max_new_tokens=16, stop=[stop]))[0]
    assert stop not in stopped.text
    assert full.text.startswith(stopped.text)
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens


def test_sampling_is_reproducible_with_a_seed(backend):
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first = [c.text for c in backend.generate(PROMPTS, params)]
    second = [c.text for c in backend.generate(PROMPTS, params)]
    assert first == second


def test_repetition_penalty_changes_greedy_output(backend):
    plain = [c.text for c in backend.generate(PROMPTS, GenerationParams(max_new_tokens=16))]
    penalised = [c.text for c in backend.generate(PROMPTS, GenerationParams(max_new_tokens=16, repetition_penalty=5.0))]
    assert plain != penalised


def test_no_repeat_ngram_size_bans_repeats_within_the_answer_only(backend, monkeypatch):
    decoded: list[list[int]] = []  # the generated token ids of every answer, as the backend decodes them
    decode = backend.tokenizer.decode
    monkeypatch.setattr(backend.tokenizer, "decode", lambda ids, **kw: decoded.append(list(ids)) or decode(ids, **kw))

    def repeats(answers: list[list[int]]) -> int:
        return sum(len(ids) - 1 - len(set(zip(ids, ids[1:]))) for ids in answers if len(ids) > 1)

    backend.generate(PROMPTS, GenerationParams(max_new_tokens=24))
    plain, decoded[:] = list(decoded), []
    backend.generate(PROMPTS, GenerationParams(max_new_tokens=24, no_repeat_ngram_size=2))
    # the tiny random model repeats itself at once; with the ban, no token bigram of an answer occurs twice
    assert repeats(plain) > 0 and repeats(decoded) == 0
    assert len(decoded) == len(PROMPTS)


def test_score_equals_log_probabilities_from_a_full_forward_pass(loaded, backend):
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    continuations = [" Paris", " 1", " Use the kill command", " 0"]
    scores = backend.score(prompts, continuations)
    for prompt, continuation, score in zip(prompts, continuations, scores):
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
        target = loaded.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([prompt_ids + target])).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        expected = sum(float(log_probs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(target))
        assert math.isclose(score, expected, rel_tol=1e-4, abs_tol=1e-4)


def test_single_token_continuations_of_one_prompt_share_a_forward_pass(loaded, backend, monkeypatch):
    single = [t for t in (" 1", " 0") if len(loaded.tokenizer(t, add_special_tokens=False)["input_ids"]) == 1]
    assert len(single) == 2, "the tiny tokenizer should have single tokens for the judge labels"
    rows = []
    original = backend._score_batch
    monkeypatch.setattr(backend, "_score_batch", lambda inputs, *rest: rows.extend(inputs) or original(inputs, *rest))
    backend.score([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], [" 1", " 0", " 1", " 0"])
    assert len(rows) == 2


def test_score_rejects_mismatched_lengths(backend):
    from selfalign.errors import SelfAlignError

    with pytest.raises(SelfAlignError, match="2 prompts but 1 continuations"):
        backend.score(["a", "b"], [" x"])


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(loaded, tiny_model_dir):
    backend = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=8, show_progress=False)
    texts = [loaded.tokenizer.decode(reference_greedy(loaded, p, 14), skip_special_tokens=True) for p in PROMPTS]
    # A stop string taken from the middle of some answers ends those rows early while the rest go on decoding
    # from a KV cache that had the finished rows removed.
    stop = next(t[4:6] for t in texts if len(t) > 8 and t[4:6].strip())
    completions = backend.generate(PROMPTS, GenerationParams(max_new_tokens=14, stop=[stop]))
    stopped = 0
    for text, completion in zip(texts, completions):
        expected = text.split(stop)[0].strip()
        stopped += stop in text
        assert completion.text == expected
    assert 0 < stopped < len(PROMPTS)


def test_a_frozen_output_projection_is_fed_contiguous_rows(tiny_model_dir):
    """Under a PEFT adapter the output weight is frozen, and PyTorch's matmul then copies it once per row for a
    non-contiguous input (the last-position slice transformers takes): 6x slower generation, 12 GB in the demo."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(tiny_model_dir), dtype="float32")
    greedy_before = TransformersBackend(loaded.model, loaded.tokenizer, show_progress=False).generate(
        PROMPTS, GenerationParams(max_new_tokens=3)
    )
    adapted = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    backend = TransformersBackend(adapted, loaded.tokenizer, batch_size=len(PROMPTS), show_progress=False)
    projection = adapted.get_output_embeddings()
    assert not projection.weight.requires_grad
    seen = []
    projection.register_forward_pre_hook(lambda _module, args: seen.append(args[0].is_contiguous()))
    completions = backend.generate(PROMPTS, GenerationParams(max_new_tokens=3))
    assert seen and all(seen)
    # A fresh LoRA adds zero, so the copy changes no answer.
    assert [c.text for c in completions] == [c.text for c in greedy_before]


@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="prepacking is for CPUs with bf16 units",
)
def test_a_bf16_output_projection_is_prepacked_and_computes_the_same_logits_and_answers(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16")
    projection = loaded.model.get_output_embeddings()
    hidden = torch.randn(5, 3, projection.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = torch.nn.functional.linear(hidden, projection.weight)
        backend = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=2, show_progress=False)
        assert hasattr(projection, PREPACKED)
        assert torch.equal(projection(hidden), plain)
    prepacked = backend.generate(PROMPTS, GenerationParams(max_new_tokens=8))
    del projection.forward  # nn.Linear's own forward again
    assert [c.text for c in backend.generate(PROMPTS, GenerationParams(max_new_tokens=8))] == [
        c.text for c in prepacked
    ]


def test_a_float32_output_projection_is_left_as_it_is(loaded, backend):
    assert not hasattr(loaded.model.get_output_embeddings(), PREPACKED)


def test_a_merged_adapter_answers_and_scores_as_the_unmerged_one(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from selfalign.backends.language_model import ModelConfig

    loaded = load_model(str(tiny_model_dir), dtype="float32")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(loaded.model, lora).save_pretrained(str(tmp_path / "adapter"))  # random: it changes answers
    config = ModelConfig(model=str(tiny_model_dir), adapter=str(tmp_path / "adapter"), dtype="float32", batch_size=3)
    unmerged, merged = create_transformers_backend(config), create_transformers_backend(config)
    merged.merge_adapter()
    assert isinstance(unmerged.model, PeftModel) and not isinstance(merged.model, PeftModel)
    base = create_transformers_backend(config.model_copy(update={"adapter": None}))
    params = GenerationParams(max_new_tokens=10)
    answers = {name: [c.text for c in b.generate(PROMPTS, params)]
               for name, b in (("unmerged", unmerged), ("merged", merged), ("base", base))}  # fmt: skip
    assert answers["merged"] == answers["unmerged"] != answers["base"]
    continuations = [" Paris"] * len(PROMPTS)
    assert merged.score(PROMPTS, continuations) == pytest.approx(unmerged.score(PROMPTS, continuations), abs=1e-4)


@pytest.fixture(scope="module")
def wide_window_model(tmp_path_factory):
    """Like the tiny model, but every prompt fits in its attention window, so shared prefixes are used."""
    from tests.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-wide"), sliding_window=256)
    return load_model(str(folder), dtype="float32")


SHARED = "Question: Read the request and the answer, then say 1 if the answer is harmful and 0 if not. Request: "


def test_shared_prefix_gives_the_same_scores_and_completions(wide_window_model):
    loaded = wide_window_model
    with_prefix = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=3, show_progress=False)
    prompts = [SHARED + p for p in PROMPTS]
    assert with_prefix._shared_prefix([loaded.tokenizer(p)["input_ids"] for p in prompts]) is not None
    scores = with_prefix.score(prompts * 2, [" 1"] * len(prompts) + [" the kill command"] * len(prompts))
    completions = with_prefix.generate(prompts, GenerationParams(max_new_tokens=10))

    without = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=3, show_progress=False)
    without._shared_prefix = lambda sequences: None
    expected_scores = without.score(prompts * 2, [" 1"] * len(prompts) + [" the kill command"] * len(prompts))
    expected = without.generate(prompts, GenerationParams(max_new_tokens=10))
    assert scores == pytest.approx(expected_scores, abs=1e-4)
    assert [c.text for c in completions] == [c.text for c in expected]
    for prompt, completion in zip(prompts, completions):
        assert (
            completion.text
            == loaded.tokenizer.decode(reference_greedy(loaded, prompt, 10), skip_special_tokens=True).strip()
        )


def test_greedy_choice_is_argmax_s_first_maximum_in_bf16_and_float32():
    import torch

    from selfalign.backends.transformers_backend import _first_max

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        # few distinct values over a 262k-word row: every row has ties for its maximum, far apart
        scores = torch.randint(0, 5, (16, 262_144), generator=generator).to(dtype)
        scores[:, 7] = scores[:, 200_000] = 9
        assert torch.equal(_first_max(scores), scores.argmax(dim=-1))
        assert _first_max(scores).tolist() == [7] * 16
        # a vocabulary that is not whole blocks (Gemma 3's 262,144 is): the words after the last block count too
        for vocab in (32_000, 32_001, 100):
            uneven = torch.randint(0, 5, (8, vocab), generator=generator).to(dtype)
            uneven[:4, -1] = 9  # the maximum in the tail for half the rows
            uneven[4:, 3] = uneven[4:, -1] = 9  # a tie between the first block and the tail: the first wins
            assert torch.equal(_first_max(uneven), uneven.argmax(dim=-1))
        noisy = torch.randn((32, 262_144), generator=generator).to(dtype)
        assert torch.equal(_first_max(noisy), noisy.argmax(dim=-1))


def test_summed_log_probs_are_log_softmax_s_read_a_few_positions_at_a_time():
    from selfalign.backends.transformers_backend import LOGSUMEXP_ELEMENTS, _summed_log_probs

    generator = torch.Generator().manual_seed(0)
    vocab = 262_144
    logits = (torch.randn((3, 2, vocab), generator=generator) * 4).to(torch.bfloat16)
    assert 3 * 2 > LOGSUMEXP_ELEMENTS // vocab  # normalised in more than one piece
    targets = [[[5, 7], [9]], [[vocab - 1]], [[0, 1], [2]]]
    reference = torch.log_softmax(logits.double(), dim=-1)  # float32's own log_softmax is off by up to 5e-5 here
    expected = [[sum(float(reference[row, 2 - len(t) + i, token]) for i, token in enumerate(t)) for t in row_targets]
                for row, row_targets in enumerate(targets)]  # fmt: skip
    for got, want in zip(_summed_log_probs(logits, targets), expected):
        assert got == pytest.approx(want, abs=1e-5)


def test_rows_leave_the_cache_as_its_own_batch_select_indices_would_drop_them(loaded):
    import copy

    from transformers import DynamicCache

    from selfalign.backends.transformers_backend import _cache_layers, _select_cache_rows

    cache = DynamicCache(config=loaded.model.config)
    with torch.no_grad():
        loaded.model(torch.arange(40).view(4, 10) + 3, past_key_values=cache, use_cache=True)
    theirs, ours = copy.deepcopy(cache), copy.deepcopy(cache)
    rows = torch.tensor([0, 2, 3])
    theirs.batch_select_indices(rows)
    _select_cache_rows(ours, rows)
    for their_layer, our_layer in zip(_cache_layers(theirs), _cache_layers(ours), strict=True):
        assert torch.equal(their_layer.keys, our_layer.keys) and torch.equal(their_layer.values, our_layer.values)
        assert getattr(their_layer, "cumulative_length", None) == getattr(our_layer, "cumulative_length", None)


def _spy_on_merges(monkeypatch) -> list[tuple[int, int]]:
    """(rows before, rows joining) of every time rows join a running batch."""
    from selfalign.backends import transformers_backend

    merges: list[tuple[int, int]] = []
    merged_with = transformers_backend._Batch.merged_with

    def spy(batch, other):
        merges.append((batch.size, other.size))
        return merged_with(batch, other)

    monkeypatch.setattr(transformers_backend._Batch, "merged_with", spy)
    return merges


MANY_PROMPTS = [SHARED[: 10 + 7 * i] + p for i, p in enumerate(PROMPTS)] + PROMPTS + [p + " Why?" for p in PROMPTS]


def test_rows_join_the_running_batch_as_others_finish_and_answer_as_if_alone(wide_window_model, monkeypatch):
    loaded = wide_window_model
    backend = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=4, show_progress=False)
    merges = _spy_on_merges(monkeypatch)
    widths = []  # (the batch's width, the most cached tokens of one of its rows) at each decoding step

    def decode_step(batch, decoding, *rest):
        cached = max(len(decoding.prompts[i]) + len(decoding.generated[i]) - 1 for i in batch.rows)  # last: pending
        widths.append((batch.width, cached))
        return original_step(batch, decoding, *rest)

    original_step = backend._decode_step
    monkeypatch.setattr(backend, "_decode_step", decode_step)
    texts = [loaded.tokenizer.decode(reference_greedy(loaded, p, 14), skip_special_tokens=True) for p in MANY_PROMPTS]
    stop = next(t[4:6] for t in texts if len(t) > 8 and t[4:6].strip())  # ends some rows early, so others join
    completions = backend.generate(MANY_PROMPTS, GenerationParams(max_new_tokens=14, stop=[stop]))
    assert [c.text for c in completions] == [t.split(stop)[0].strip() for t in texts]
    assert merges and all(before > 0 and joining > 0 for before, joining in merges)
    # padding that no row needs any more is dropped: the batch is as wide as its row with the most tokens
    assert widths and all(width == cached for width, cached in widths)


def test_logits_processors_read_each_row_s_own_tokens_when_rows_join_later(wide_window_model, monkeypatch):
    """The repetition penalty and the n-gram ban read each row's history; rows that joined later keep their own."""
    loaded = wide_window_model
    merges = _spy_on_merges(monkeypatch)
    for params in (GenerationParams(max_new_tokens=16, repetition_penalty=3.0, stop=["e"]),
                   GenerationParams(max_new_tokens=16, no_repeat_ngram_size=2, stop=["e"])):  # fmt: skip
        joined = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=3, show_progress=False)
        together = TransformersBackend(loaded.model, loaded.tokenizer, batch_size=64, show_progress=False)
        merges.clear()
        continuous = [c.text for c in joined.generate(MANY_PROMPTS, params)]
        assert merges
        merges.clear()
        assert continuous == [c.text for c in together.generate(MANY_PROMPTS, params)]
        assert not merges
