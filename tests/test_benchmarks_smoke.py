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


# --- separation benchmark (benchmarks/separation.py) ---------------------------------------------------------------
def _separation():
    import importlib.util

    spec = importlib.util.spec_from_file_location("separation", ROOT / "benchmarks" / "separation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("separation", module)
    spec.loader.exec_module(module)
    return module


def test_lr_choice_prefers_the_lower_lr_within_one_item_and_finds_grid_edges() -> None:
    from lime_examples.bench.paired_stats import choose_lr, grid_edge, widen

    assert choose_lr({1e-3: 700, 2e-3: 701, 4e-3: 650}) == 1e-3  # one item apart: noise, the lower lr wins
    assert choose_lr({1e-3: 699, 2e-3: 701, 4e-3: 701}) == 2e-3  # exact tie: the lower lr, never float order
    grid = [1e-3, 2e-3, 4e-3]
    assert [grid_edge(lr, grid) for lr in grid] == ["low", None, "high"]
    assert widen(grid, "low") == pytest.approx(5e-4) and widen(grid, "high") == pytest.approx(8e-3)


def test_lr_search_widens_the_grid_at_an_edge_and_logs_it() -> None:
    sep = _separation()
    args = sep.parse_args(["--lrs", "1e-3", "2e-3", "4e-3", "--max_widen", "2"])
    gold = ["aaaa", "bbbb"]
    best = {5e-4: 1, 1e-3: 4, 2e-3: 6, 4e-3: 8, 8e-3: 7}  # validation items correct per lr (of 8)
    calls = []

    def run(row, lr, seed, splits):
        calls.append((lr, seed, splits))
        n = best[lr]
        preds = "".join(gold)[:n] + "c" * (8 - n)
        return {"validation": [preds[:4], preds[4:]]}

    search = sep.search_lr(sep.Row("x", "lora"), args, run, gold)
    assert search["chosen"] == 4e-3 and search["grid"] == [1e-3, 2e-3, 4e-3, 8e-3]
    assert search["widened"] == ["high: + 0.008"] and search["correct"]["0.008"] == 7
    assert all(seed == args.search_seed and splits == ("validation",) for _, seed, splits in calls)


def test_paired_bootstrap_pairs_items_and_seeds() -> None:
    import numpy as np

    from lime_examples.bench.paired_stats import PairedBootstrap, call

    rng = np.random.default_rng(0)
    sizes = [50, 30]
    a = (rng.random((3, 80)) < 0.6).astype(np.int8)
    boot = PairedBootstrap(sizes, num_seeds=3, replicates=500)
    assert boot.interval(a, a) == (0.0, 0.0, 0.0)  # paired: a method minus itself never moves
    est, low, high = boot.interval(a)
    assert est == pytest.approx((a[:, :50].mean() + a[:, 50:].mean()) / 2) and low <= est <= high
    better = a.copy()
    better[:, :10] = 1  # strictly better on some items, equal elsewhere
    diff = boot.interval(better, a)
    assert diff[1] >= 0 and call(diff) in ("higher", "not resolved") and diff[0] > 0


def test_digit_tasks_share_inputs_conflict_and_hold_out_evaluation_strings() -> None:
    from lime_examples.bench.digit_tasks import TASKS, DigitSuite

    suite = DigitSuite(["last_mod3", "first_mod3", "first_vs_last", "sevens_parity"], 5, 20, 50)
    assert suite.labels == ["a", "b", "c"] and suite.task_label_ids()[3] == [0, 1]
    assert len(suite.test) == 4 * 50 and suite.test[0].text.split()[1:] == [str(d) for d in suite.test[0].digits]
    per_task = [[ex.digits for ex in suite.test if ex.task == t] for t in range(4)]
    assert all(strings == per_task[0] for strings in per_task)  # the same inputs under every task
    labels = {d: [TASKS[n].rule(d) for n in ("last_mod3", "first_mod3")] for d in per_task[0]}
    assert any(a != b for a, b in labels.values())  # the rules disagree on shared inputs
    draw, again = suite.train_stream(7, 64), suite.train_stream(7, 64)
    batch = draw(2)
    assert [ex.text for ex in batch] == [ex.text for ex in again(2)]  # a function of the seed only
    assert all(ex.task == 2 and ex.digits not in suite.held_out for ex in batch)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_separation_quick_writes_every_row_with_per_example_predictions(tmp_path: Path) -> None:
    """`python benchmarks/separation.py --quick` exits 0; report, JSON and run log hold every row."""
    import json

    # One thread: the ops are tiny, and two threads on a 2-core machine shared with other jobs oversubscribe it.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/separation.py", "--quick", "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,  # ~30 s on an idle core, ~3 min on a busy shared machine
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "separation.json").read_text())
    names = list(result["summary"])
    assert names[0] == "LoRA r=8" and names[-1] == "LoRA r=8 per task (upper bound)"
    assert any(n.startswith("LiME E=8, micro-batch") for n in names) and any(n.startswith("MoLoRA") for n in names)
    md = (tmp_path / "separation.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "## Verdict" in md and "e-0" not in md and "e+0" not in md
    for name, s in result["summary"].items():
        assert s["seeds"] == [1, 2] and 0.0 <= s["macro"][0] <= 1.0
        assert ("routing" in s) == name.startswith("LiME")
    runs = [json.loads(line) for line in (tmp_path / "separation_runs.jsonl").read_text().splitlines()]
    tests = [r for r in runs if "test" in r]
    assert tests and all(len(r["test"]) == 4 and all(len(p) == 8 for p in r["test"]) for r in tests)
    assert all(r["seed"] == 0 for r in runs if "validation" in r)
