"""Build tiny random causal LMs and tokenizers on disk, offline, in about a second: Gemma 3 (the embedded model's
architecture), Mistral (the reference configs' Mistral-7B-Instruct-v0.1, no chat template: `mistral-inst`) and Llama
with Llama-3-Instruct's chat template and special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "Question: What is the capital of France?\nAnswer: Paris is the capital of France.",
    "How do I kill a Python process? Use the kill command with the process id.",
    "I can't help with that request because it could hurt people.",
    "Write a short poem about the rain falling on the roof at night.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "#answer: 1 #reason: the response explains how to do harm. #answer: 0 harmless",
    "[INST] Tell me a joke [/INST] Why did the chicken cross the road?",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_tokenizer(specials: list[str], bos: str, eos: str, pad: str | None, unk: str, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on CORPUS that adds `bos` in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )


def build_tiny_model(folder: Path, chat_template: bool = False, vocab_size: int = 512, sliding_window: int = 8) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    fast = _tiny_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", vocab_size=vocab_size
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)

    config = Gemma3TextConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# Meta-Llama-3-8B-Instruct's chat template: the template writes BOS itself and ends every turn with <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_TINY_DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=2048,
)  # fmt: skip


def build_tiny_mistral(folder: Path) -> Path:
    """A 2-layer MistralForCausalLM (random weights, sliding window as Mistral-7B-v0.1 has) whose tokenizer is
    shaped like Mistral-7B-Instruct-v0.1's: <s>, </s>, <unk>, BOS added on encoding, no pad token, no chat
    template, and [INST] as ordinary text."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    fast = _tiny_tokenizer(["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None, unk="<unk>")
    fast.save_pretrained(folder)
    config = MistralConfig(
        vocab_size=len(fast), sliding_window=4096, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        **_TINY_DECODER,
    )  # fmt: skip
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_llama3(folder: Path) -> Path:
    """A 2-layer LlamaForCausalLM (random weights) with Llama-3-Instruct's special tokens and chat template: the
    tokenizer adds <|begin_of_text|> and the template writes it too; <|eot_id|> ends a turn (the EOS); no pad."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|unk|>"]  # fmt: skip
    fast = _tiny_tokenizer(specials, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk="<|unk|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, **_TINY_DECODER
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder
