"""Smoke test of the efficiency benchmark (issue 5) and of the trainable-parameter formulas it asserts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ._models import tiny_llama_config

ROOT = Path(__file__).resolve().parent.parent


def test_lime_parameter_ratios_on_smollm2() -> None:
    """LiME E=8 (shared expert) on SmolLM2-135M's seven targets at rank 8: ~0.29x MixLoRA, ~0.19x MoLoRA-style."""
    from lime_examples.bench.param_counts import (
        lime_params,
        lora_params,
        mixlora_params,
        molora_params,
        smollm2_135m_config,
    )

    config = smollm2_135m_config(30)
    lime = lime_params(config, r=8, num_experts=8, shared_expert=True)
    assert lora_params(config, r=8) == 30 * 81_408  # r (d_in + d_out) summed over q/k/v/o/gate/up/down
    assert lime - lora_params(config, r=8) == 30 * (9 * 5_184 + 7)  # E d_out + d_out + 1 per target
    assert abs(lime / mixlora_params(config, r=8, num_experts=8) - 0.29) < 0.02
    assert abs(lime / molora_params(config, r=8, num_experts=8) - 0.19) < 0.02


def _tiny_llama():
    from transformers import LlamaForCausalLM

    from lime_examples.bench.param_counts import smollm2_135m_config

    torch.manual_seed(0)
    cfg = smollm2_135m_config(1).to_dict()
    cfg.update(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(tiny_llama_config(**cfg))


def test_measured_parameters_match_formulas() -> None:
    """Every method's trainable parameters, counted on the built modules, equal its formula; a train step runs."""
    from lime_examples.bench.harness import make_trained, train_step, trainable_parameters
    from lime_examples.bench.methods import all_methods

    base = _tiny_llama()
    ids = torch.randint(3, 64, (2, 8))
    for method in all_methods(include_package=False):
        model, aux = method.build(copy.deepcopy(base))
        assert trainable_parameters(model) == method.expected_params(base.config), method.name
        loss = train_step(make_trained(model, aux, ids, torch.ones_like(ids)))
        assert loss == loss, f"{method.name}: NaN loss"


def test_mixlora_reimplementation_matches_package() -> None:
    """On identical weights our MixLoRA computes the same logits as the pip package mixlora 0.2.3."""
    from lime_examples.bench.baselines.mixlora_pkg import check_parity, package_status

    usable, reason = package_status()
    if not usable:
        pytest.skip(f"mixlora 0.2.3 {reason}")
    assert check_parity(_tiny_llama()) < 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_benchmark_runs_and_lists_every_method(tmp_path: Path) -> None:
    """`python benchmarks/efficiency.py --quick` exits 0 and its report names every method."""
    from lime_examples.bench.methods import required_method_names

    quick_md = tmp_path / "efficiency.md"  # --out: never into benchmarks/results/quick/ of the checkout
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/efficiency.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,  # ~30 s on 2 idle cores; generous for a machine shared with other jobs
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = quick_md.read_text()
    for name in required_method_names():
        assert f"| {name} |" in text, f"{name} missing from {quick_md}"
    assert "| LiME E=8 |" in proc.stdout  # the table is printed too
    for suffix in ("json", "png"):
        assert (tmp_path / f"efficiency.{suffix}").stat().st_size > 0
