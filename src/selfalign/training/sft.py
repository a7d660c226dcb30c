"""`selfalign train sft`: a LoRA adapter trained with TRL's SFTTrainer on the chosen answers of preference pairs.

Prompts are rendered by the model's prompt format, the one generation uses, and the loss covers the answer only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfalign.training.common import (
    TrainingOutputs,
    bf16_matmuls,
    last_checkpoint,
    load_base_model,
    load_split_pairs,
    lora_config,
    prepare_examples,
    require_examples,
    run_description,
    save_outputs,
    train_and_evaluate,
    trainer_arguments,
)
from selfalign.training.config import TrainingConfig
from selfalign.training.cpu_speed import (
    frozen_matmuls_in_bf16,
    lm_head_on_answer_positions,
    lora_dropout_from_random_bits,
)
from selfalign.training.data import sft_examples


def run_sft(
    config: TrainingConfig, data: str, out: str | Path, merge: bool = False, callbacks: list[Any] | None = None
) -> TrainingOutputs:
    """Train an SFT adapter on `data` (preference pairs) into `out`, resuming from its last checkpoint if any."""
    from trl import SFTConfig, SFTTrainer

    # --- Setup: trainer arguments first; building them starts the distributed state that later steps use.
    out = Path(out)
    args = trainer_arguments(SFTConfig, config, out, config.sft, completion_only_loss=True)
    checkpoint = last_checkpoint(args, config)
    pairs = load_split_pairs(config, data)  # before the model loads, so that bad data fails fast

    # --- Model: the base (4-bit NF4 on CUDA with bitsandbytes); TRL puts a fresh LoRA adapter on it.
    base, prompt_format = load_base_model(config)

    # --- Data: (prompt, chosen) rendered as generation renders them; helpful pairs mixed in unless excluded.
    def to_examples(pairs: Any) -> Any:
        return sft_examples(pairs, prompt_format, data, config.system_prompt, config.sft.pair_types)

    train_set, eval_set, counts = prepare_examples(pairs, to_examples, prompt_format, config, data, out, args, "SFT")

    # --- Train: TRL masks the prompt tokens out of the labels (completion_only_loss).
    with (
        lm_head_on_answer_positions(config.lm_head_answer_only),
        frozen_matmuls_in_bf16(base.model, bf16_matmuls(config)),
    ):
        trainer = SFTTrainer(
            model=base.model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=base.tokenizer,
            peft_config=lora_config(config.lora),
            callbacks=callbacks,
        )
        require_examples(trainer, data, "SFT", config.max_length)
        with lora_dropout_from_random_bits(trainer.model, config.lora_dropout_from_random_bits):  # TRL added LoRA
            results = train_and_evaluate(trainer, out, checkpoint)

    # --- Save
    metrics = {"stage": "sft", **run_description(config, data, prompt_format, counts), **results}
    return save_outputs(trainer, config, out, metrics, merge)
