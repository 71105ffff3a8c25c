"""Baseline MoE-LoRA adapters for the benchmarks, written as plain ``nn.Module`` wrappers (not part of peft_lime)."""
