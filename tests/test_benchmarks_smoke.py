"""Smoke tests of the benchmarks (efficiency headline and variants, separation), the trainable-parameter formulas
the efficiency benchmark asserts, and its markdown report built from a synthetic result."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ._models import tiny_llama_config
from ._scripts import load_benchmark

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


def _run_efficiency(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    # ~20 s (headline) / ~40 s (variants) on 2 idle cores; the timeout is generous for a shared machine.
    return subprocess.run([sys.executable, "benchmarks/efficiency.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=540)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_benchmark_runs_and_lists_every_method(tmp_path: Path) -> None:
    """`python benchmarks/efficiency.py --quick` exits 0; efficiency.md / .json name every headline method, hold the
    targets table, and the markdown is rebuilt identically from the JSON (what --from-json does)."""
    import json

    from lime_examples.bench.headline import HEADLINE_METHODS
    from lime_examples.bench.headline_report import RATIO_TARGETS, to_markdown

    proc = _run_efficiency("--quick", "--out", str(tmp_path))  # --out: never into benchmarks/results/ of the checkout
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "efficiency.md").read_text()
    result = json.loads((tmp_path / "efficiency.json").read_text())
    for name in HEADLINE_METHODS:
        assert f"| {name} |" in text, f"{name} missing from efficiency.md"
        assert len(result["eager"]["samples"]["train"][name]) == 2 and result["eager"]["peak_bytes"][name] > 0
    assert "| LiME E=8 |" in proc.stdout  # the report is printed too
    sections = ["## Machine", "## Headline: eager", "## Compiled", "## Targets", "## Per-op profile", "## Methods"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    assert "| target | measured | met |" in text and len(result["targets"]) == len(RATIO_TARGETS) + 2
    assert all(f"| {label} |" in text for label, *_ in RATIO_TARGETS)
    assert "| compiled train step <= 1.10x compiled LoRA | not measured | - |" in text  # --quick: no compile
    assert result["machine"]["commit"] and result["command"].startswith("python benchmarks/efficiency.py --quick")
    assert to_markdown(result) == text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_variants_benchmark_lists_every_method(tmp_path: Path) -> None:
    """`python benchmarks/efficiency.py --variants --quick` exits 0 and efficiency_variants.* name every variant."""
    from lime_examples.bench.methods import required_method_names

    proc = _run_efficiency("--variants", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "efficiency_variants.md").read_text()
    for name in required_method_names():
        assert f"| {name} |" in text, f"{name} missing from efficiency_variants.md"
    for suffix in ("json", "png"):
        assert (tmp_path / f"efficiency_variants.{suffix}").stat().st_size > 0
    assert not (tmp_path / "efficiency.md").exists()


def _synthetic_headline(compiled: bool) -> dict:
    """A headline result as efficiency.py writes it, with exact per-repetition ratios to LoRA (no measuring)."""
    from lime_examples.bench.headline import Workload
    from lime_examples.bench.methods import LIME_E8, LORA, MIXLORA, MOLORA

    def samples(ratio: dict[str, float]) -> dict[str, list[float]]:
        return {name: [r * t for t in (1.0, 1.1, 0.9)] for name, r in ratio.items()}

    every = (LORA, LIME_E8, MOLORA, MIXLORA)
    eager = {
        "params": dict(zip(every, (100, 157, 849, 540))),
        "methods": {name: f"{name} description" for name in every},
        "peak_bytes": {LORA: 100 * 2**20, LIME_E8: 102 * 2**20, MOLORA: 118 * 2**20, MIXLORA: 110 * 2**20},
        "samples": {
            "train": samples({LORA: 1.0, LIME_E8: 1.2, MOLORA: 1.8, MIXLORA: 1.44}),  # 1.20x: over 1.15
            "eval": samples({LORA: 1.0, LIME_E8: 1.05, MOLORA: 1.2, MIXLORA: 1.1}),  # 1.05x: under 1.10
            "eval_stats_on": samples({LIME_E8: 1.12}),
            "decode": samples({LORA: 0.1, LIME_E8: 0.14, MOLORA: 0.13, MIXLORA: 0.12}),  # 1.40x: over 1.30
        },
    }
    machine = {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "torch": "t", "transformers": "tf", "peft": "p",
               "python": "3", "date": "2025-01-01 00:00", "commit": "abc1234-dirty"}
    ops = {"decode (1 token)": {"lora": {"aten::mm": {"calls": 2.0, "self_ms": 0.01}},
                                "lime": {"aten::mm": {"calls": 3.0, "self_ms": 0.02},
                                         "aten::softmax": {"calls": 1.0, "self_ms": 0.005}}}}
    return {
        "command": "python benchmarks/efficiency.py",
        "machine": machine,
        "args": {**Workload(reps=3).to_dict(), "quick": False, "no_compile": not compiled},
        "wall_seconds": 60.0,
        "eager": eager,
        "compiled": {"layers": 8, "backend": "inductor", "compile_seconds": {LORA: 100.0, LIME_E8: 900.0},
                     "samples": {"train": samples({LORA: 1.0, LIME_E8: 1.05}),  # 1.05x: under 1.10
                                 "decode": samples({LORA: 0.05, LIME_E8: 0.06})}}  # 1.20x: over 1.15
        if compiled else None,
        "layer_ops": {"before_path": "b.json", "after_path": "a.json",
                      "before": {"label": "before", "commit": "1111111", "result": ops},
                      "after": {"label": "after", "commit": "2222222", "result": ops}},
    }


def test_efficiency_markdown_reports_targets_met_and_missed() -> None:
    """The headline markdown, from a synthetic result: 'no' with the measured ratio over a limit, 'yes' under it,
    'not measured' for the compiled rows when the compiled table was skipped; the layer-ops before/after table."""
    from lime_examples.bench.headline_report import target_rows, to_markdown

    md = to_markdown(_synthetic_headline(compiled=True))
    assert "| eager train step <= 1.15x LoRA | 1.200x | no |" in md
    assert "| eager eval forward, stats off <= 1.10x LoRA | 1.050x | yes |" in md
    assert "| eager eval forward, stats on <= 1.15x LoRA | 1.120x | yes |" in md
    assert "| eager decode ms/token <= 1.30x LoRA | 1.400x | no |" in md
    assert "| peak train memory <= 1.05x LoRA | 1.020x | yes |" in md
    assert "| compiled train step <= 1.10x compiled LoRA | 1.050x | yes |" in md
    assert "| compiled decode ms/token (static cache) <= 1.15x compiled LoRA | 1.200x | no |" in md
    assert "| train step >= 1.3x faster than MoLoRA-style E=8 top-2 (its time / LiME's) | 1.500x | yes |" in md
    assert "| train step >= 1.3x faster than MixLoRA (its time / LiME's) | 1.200x | no |" in md
    assert "| issue 25: eager eval forward, stats off <= 1.05x LoRA | 1.050x | yes |" in md
    assert "| issue 25: eager train step <= 1.10x LoRA | 1.200x | no |" in md
    assert "| issue 25: compile time <= 2x compiled LoRA's | 9.000x | no |" in md
    assert "| LiME E=8 | 157 (1.57x) | 1.200 s (1.200x [1.20-1.20]) |" in md
    assert "Before: before (commit 1111111); after: after (commit 2222222)" in md
    assert "| decode (1 token) | 2 | 4 | 4 | 0.010 | 0.025 | 0.025 |" in md and "| aten::softmax | 1 | 0.005 |" in md
    assert "commit: abc1234-dirty" in md and "Test CPU; 2 cores, 2 torch threads" in md
    skipped = _synthetic_headline(compiled=False)
    md = to_markdown(skipped)
    assert "| compiled train step <= 1.10x compiled LoRA | not measured | - |" in md
    assert "| compiled decode ms/token (static cache) <= 1.15x compiled LoRA | not measured | - |" in md
    assert "Not measured (`--no-compile`)." in md
    rows = {r["target"]: r for r in target_rows(skipped)}
    assert rows["eager train step <= 1.15x LoRA"]["met"] is False and rows["peak train memory <= 1.05x LoRA"]["met"]
    assert rows["compiled train step <= 1.10x compiled LoRA"]["measured"] is None


# --- separation benchmark (benchmarks/separation.py) ---------------------------------------------------------------


def test_lr_choice_prefers_the_lower_lr_within_one_item_and_finds_grid_edges() -> None:
    from lime_examples.bench.paired_stats import choose_lr, grid_edge, widen

    assert choose_lr({1e-3: 700, 2e-3: 701, 4e-3: 650}) == 1e-3  # one item apart: noise, the lower lr wins
    assert choose_lr({1e-3: 699, 2e-3: 701, 4e-3: 701}) == 2e-3  # exact tie: the lower lr, never float order
    grid = [1e-3, 2e-3, 4e-3]
    assert [grid_edge(lr, grid) for lr in grid] == ["low", None, "high"]
    assert widen(grid, "low") == pytest.approx(5e-4) and widen(grid, "high") == pytest.approx(8e-3)


def test_lr_search_widens_the_grid_at_an_edge_and_logs_it() -> None:
    sep = load_benchmark("separation")
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


def test_low_rank_kernel_benchmark_checks_and_times_every_build(tmp_path: Path) -> None:
    """`python benchmarks/low_rank_kernel.py --quick`: every build shape is built, checked against torch (tails of
    tokens and columns at d = 33) and timed, and the markdown has a row per build."""
    import json

    bench = load_benchmark("low_rank_kernel")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "low_rank_kernel.json").read_text())
    text = (tmp_path / "low_rank_kernel.md").read_text()
    assert result["widths"] == [33] and result["lora"]["33"]["backward_ms"] > 0
    for label, _ in bench.BUILDS:
        row = result["builds"][label]["33"]
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0
        assert f"| {label} | 33 |" in text
    assert text == bench.render(result)
