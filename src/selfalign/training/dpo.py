"""`selfalign train dpo`: a LoRA adapter trained with TRL's DPOTrainer on preference pairs.

DPO starts from the base model with a fresh adapter (as the reference experiment did) or continues an SFT adapter
(SFT then DPO, as the alignment-handbook recipes do). No second copy of the model is loaded: TRL's reference is the
base with the adapter disabled in the first case and a frozen copy of the SFT adapter in the second. The run records
which, and stops when the first step's loss shows that the reference is not the starting policy.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from selfalign.errors import SelfAlignError
from selfalign.training.common import (
    FirstStepLossCheck,
    ReleaseFreeHeap,
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
from selfalign.training.cpu_speed import frozen_matmuls_in_bf16, lm_head_on_answer_positions, log_probs_only
from selfalign.training.data import dpo_examples


def run_dpo(
    config: TrainingConfig, data: str, out: str | Path, merge: bool = False, callbacks: list[Any] | None = None
) -> TrainingOutputs:
    """Train a DPO adapter on `data` (preference pairs) into `out`, resuming from its last checkpoint if any."""
    from trl import DPOConfig

    # --- Setup: trainer arguments first; building them starts the distributed state that later steps use.
    out = Path(out)
    settings = config.dpo
    args = trainer_arguments(DPOConfig, config, out, settings)
    checkpoint = last_checkpoint(args, config)
    pairs = load_split_pairs(config, data)  # before the model loads, so that bad data fails fast

    # --- Model: the base, to which TRL adds a fresh LoRA adapter, or the base with the SFT adapter to continue.
    base, prompt_format = load_base_model(config)
    policy, new_adapter = base.model, lora_config(config.lora)
    if settings.sft_adapter:
        policy, new_adapter = load_trainable_adapter(base.model, settings.sft_adapter), None

    # --- Data: (prompt, chosen, rejected) rendered as generation renders them.
    def to_examples(pairs: Any) -> Any:
        return dpo_examples(pairs, prompt_format, data, config.system_prompt, settings.pair_types)

    train_set, eval_set, counts = prepare_examples(pairs, to_examples, prompt_format, config, data, out, args, "DPO")

    # --- Train (a precomputed reference is computed while the trainer is built, so the switches cover both)
    with (
        lm_head_on_answer_positions(config.lm_head_answer_only),
        frozen_matmuls_in_bf16(policy, bf16_matmuls(config)),
        reference_fingerprint_by_xxhash(),
    ):
        trainer = dpo_trainer_class()(
            model=policy,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=base.tokenizer,
            peft_config=new_adapter,
            callbacks=callbacks,
        )
        require_examples(trainer, data, "DPO", config.max_length)
        reference = reference_model(trainer)
        trainer.add_callback(FirstStepLossCheck(settings.first_step_loss_tolerance, reference))
        trainer.add_callback(ReleaseFreeHeap())  # the demo's peak stage: its heap fragments step by step
        results = train_and_evaluate(trainer, out, checkpoint)

    # --- Save
    metrics = {
        "stage": "dpo",
        **run_description(config, data, prompt_format, counts),
        "start": f"SFT adapter {settings.sft_adapter}" if settings.sft_adapter else "base model",
        "reference_model": reference,
        "reference_log_probs": "precomputed once" if settings.precompute_ref_log_probs else "computed every step",
        **results,
    }
    return save_outputs(trainer, config, out, metrics, merge)


@functools.cache
def dpo_trainer_class() -> type:
    """TRL's DPOTrainer, whose precomputed reference pass computes log-probabilities alone (`log_probs_only`: the
    shared fused LM head would also compute the entropy, mean logits and top-1 accuracy that pass drops)."""
    from trl import DPOTrainer

    class ReferenceLogProbsOnly(DPOTrainer):
        def compute_ref_log_probs(self, model: Any, inputs: Any) -> Any:
            with log_probs_only():
                return super().compute_ref_log_probs(model, inputs)

    return ReferenceLogProbsOnly


@contextlib.contextmanager
def reference_fingerprint_by_xxhash() -> Iterator[None]:
    """Within the block, TRL's DPOTrainer names its cache of precomputed reference log-probabilities by an xxh3-128
    fingerprint of the reference's weights instead of a SHA-256 of their copied bytes (`trl.trainer.utils.
    hash_module`): 1.9-2.9 s for the embedded model's 1.1 GB on 2 cores, against 0.25 s, every DPO run. Like
    `datasets`' own fingerprints, the name needs no cryptographic hash; it only has to change with the weights."""
    from trl.trainer import dpo_trainer

    sha256_of_copies = getattr(dpo_trainer, "hash_module", None)
    if sha256_of_copies is None:  # a TRL that names its cache otherwise: nothing to replace
        yield
        return
    dpo_trainer.hash_module = weights_fingerprint
    try:
        yield
    finally:
        dpo_trainer.hash_module = sha256_of_copies


def weights_fingerprint(module: torch.nn.Module) -> str:
    """xxh3-128 of every state-dict entry's name, dtype, shape and bytes, read in place (TRL's `hash_module` hashes
    dtypes and bytes only, and copies each tensor first)."""
    import xxhash

    digest = xxhash.xxh3_128()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_trainable_adapter(model: Any, folder: str) -> Any:
    """The base model with a saved adapter attached and trainable, for DPO to continue."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise SelfAlignError(f"dpo.sft_adapter: {folder} is not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, folder, is_trainable=True)


def reference_model(trainer: Any) -> str:
    """Which reference TRL chose: a fresh adapter is disabled, a pretrained one is copied into a frozen 'ref'."""
    if trainer.ref_model is not None:
        return "a separate copy of the starting model"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        return "frozen copy of the SFT adapter (PEFT adapter 'ref')"
    return "base model with the adapter disabled"
