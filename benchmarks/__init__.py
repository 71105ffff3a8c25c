"""Benchmarks of peft-lime (efficiency against LoRA, MixLoRA and MoLoRA-style baselines)."""
