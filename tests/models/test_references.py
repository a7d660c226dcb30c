import pytest

from selfalign.errors import SelfAlignError
from selfalign.models.loading import load_model, resolve_dtype
from selfalign.models.references import resolve_model_reference


def test_accepted_forms(tmp_path, tiny_model_dir):
    assert resolve_model_reference("embedded:gemma-3-270m").kind == "embedded"
    assert resolve_model_reference("mistralai/Mistral-7B-Instruct-v0.1").kind == "hub"
    assert resolve_model_reference(str(tiny_model_dir)).kind == "local"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_reference(str(gguf)).kind == "gguf"


@pytest.mark.parametrize("reference", ["embedded:gpt-5", "not a model", "./missing/folder", ""])
def test_unknown_references_list_the_accepted_forms(reference):
    with pytest.raises(SelfAlignError, match="accepted forms: embedded:NAME"):
        resolve_model_reference(reference)


def test_folder_without_config_and_missing_gguf(tmp_path):
    with pytest.raises(SelfAlignError, match="without config.json"):
        resolve_model_reference(str(tmp_path))
    with pytest.raises(SelfAlignError, match="GGUF file not found"):
        resolve_model_reference(str(tmp_path / "x.gguf"))


def test_auto_dtype_follows_the_hardware(monkeypatch):
    import torch

    from selfalign.models import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("float16") is torch.float16


def test_four_bit_without_cuda_is_a_clear_error(tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SelfAlignError, match="load_in_4bit needs a CUDA GPU"):
        load_model(str(tiny_model_dir), load_in_4bit=True)


def test_loads_a_local_folder_with_a_pad_token(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    assert loaded.tokenizer.pad_token is not None
    assert next(loaded.model.parameters()).dtype.is_floating_point


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SelfAlignError, match="cannot load model 'nobody-here/no-such-model'") as info:
        load_model("nobody-here/no-such-model")
    assert "\n" not in str(info.value)


def test_tokenizers_drop_the_python_copies_of_their_vocabulary_and_still_tokenize_and_save(tmp_path):
    """GemmaTokenizer keeps the vocabulary and merges it built its backend from; `datasets` pickled them on every
    fingerprint of a TRL `map`. Without them the tokenizer encodes, fingerprints and saves as before."""
    from datasets.fingerprint import Hasher
    from transformers import AutoTokenizer, GemmaTokenizer

    from selfalign.models.loading import INIT_COPIES, tokenizer_from_pretrained

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "▁": 7}
    GemmaTokenizer(vocab=vocab, merges=[("a", "b")]).save_pretrained(tmp_path / "saved")
    as_transformers_loads_it = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert all(name in as_transformers_loads_it.__dict__ for name in INIT_COPIES)  # what this guards against

    tokenizer = tokenizer_from_pretrained(str(tmp_path / "saved"))
    assert not any(name in tokenizer.__dict__ for name in INIT_COPIES)
    assert tokenizer("ab ab ba").input_ids == as_transformers_loads_it("ab ab ba").input_ids
    assert Hasher.hash(tokenizer) == Hasher.hash(tokenizer_from_pretrained(str(tmp_path / "saved")))  # stable
    tokenizer.save_pretrained(tmp_path / "again")
    assert AutoTokenizer.from_pretrained(tmp_path / "again").get_vocab() == as_transformers_loads_it.get_vocab()


def test_a_tokenizer_folder_is_read_once_and_every_call_gets_a_tokenizer_of_its_own(tmp_path, monkeypatch):
    import transformers
    from transformers import GemmaTokenizer

    from selfalign.models.loading import tokenizer_from_pretrained

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "▁": 7}
    GemmaTokenizer(vocab=vocab, merges=[("a", "b")]).save_pretrained(tmp_path / "saved")
    reads = []
    from_pretrained = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: reads.append(args[0]) or from_pretrained(*args, **kwargs))  # fmt: skip

    first = tokenizer_from_pretrained(str(tmp_path / "saved"))
    as_read = (first.padding_side, first.pad_token)
    first.padding_side = "right" if first.padding_side == "left" else "left"  # what callers do to their own
    first.pad_token = "<eos>"
    second = tokenizer_from_pretrained(str(tmp_path / "saved"))
    assert len(reads) == 1 and second is not first
    assert (second.padding_side, second.pad_token) == as_read != (first.padding_side, first.pad_token)
    assert second("ab ab ba").input_ids == first("ab ab ba").input_ids

    config = tmp_path / "saved" / "tokenizer_config.json"
    config.write_text(config.read_text(encoding="utf-8").replace('"<unk>"', '"<pad>"', 1), encoding="utf-8")
    tokenizer_from_pretrained(str(tmp_path / "saved"))
    assert len(reads) == 2  # a changed folder is read again
