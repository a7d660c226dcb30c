"""Training: SFT and DPO LoRA adapters with TRL (`run_sft`, `run_dpo`), configured by `TrainingConfig`."""
