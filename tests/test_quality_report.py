"""benchmarks/quality.py bookkeeping: lr choice on validation only, mean +- std over seeds, verdict wording."""

from __future__ import annotations

import json

import pytest

from ._scripts import load_benchmark

pytest.importorskip("gguf")  # quality.py runs on the demo backbone, whose extras ship with peft-lime[demo]


def _run(method, lr, seed, val, test):
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "trainable": 10,
        "train_s": 1.0,
        "validation": {"macro": val, "per_task": {"a": val}},
        "test": {"macro": test, "per_task": {"a": test}},
    }


def test_summary_uses_the_lr_chosen_on_validation_and_reports_mean_std_over_seeds():
    q = load_benchmark("quality")
    runs = [
        _run("LiME E=8", 1e-3, 0, 0.50, 0.90),  # best TEST but worse validation: must not be chosen
        _run("LiME E=8", 3e-3, 0, 0.60, 0.70),
        _run("LiME E=8", 3e-3, 1, 0.00, 0.80),
        _run("LiME E=8", 3e-3, 2, 0.00, 0.60),
        _run("LoRA r=8", 1e-3, 0, 0.40, 0.50),
        _run("LoRA r=8", 1e-3, 1, 0.00, 0.50),
        _run("LoRA r=8", 1e-3, 2, 0.00, 0.50),
    ]
    summary = q.summarise(runs, {"LiME E=8": 3e-3, "LoRA r=8": 1e-3})
    lime = summary["LiME E=8"]
    assert lime["seeds"] == [1, 2]  # seed 0 chose the lr: not part of the reported test mean
    assert lime["macro"][0] == pytest.approx(0.70)
    assert lime["macro"][1] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.8, 0.6
    verdict = q.verdict(summary)
    assert verdict == ["- LiME E=8 beats LoRA r=8: +20.0 macro-accuracy points (+1.4 std)."]
    assert q.summarise(runs[:1], {"LiME E=8": 1e-3})["LiME E=8"]["seeds"] == [0]  # a single seed is all there is


def test_verdict_calls_differences_within_noise_a_match():
    q = load_benchmark("quality")
    summary = {
        "LiME E=8": {"macro": (0.50, 0.05)},
        "MixLoRA": {"macro": (0.52, 0.05)},
    }
    assert "matches (within noise)" in q.verdict(summary)[0]


def test_resume_reuses_only_runs_made_with_the_same_protocol(tmp_path):
    from lime_examples.bench.quality_common import RunLog

    q = load_benchmark("quality")
    args = q.parse_args(["--steps", "30", "--lrs", "1e-3", "3e-3"])
    same = dict(_run("LiME E=8", 1e-3, 0, 0.5, 0.5), protocol=q.protocol(args))
    other_steps = dict(_run("LiME E=8", 3e-3, 0, 0.5, 0.5), protocol=q.protocol(q.parse_args(["--steps", "31"])))
    legacy = _run("LoRA r=8", 1e-3, 0, 0.5, 0.5)  # written before runs carried their protocol
    path = tmp_path / "quality_runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (same, other_steps, legacy)) + "\n")
    log = RunLog(path, q.protocol(args), resume=True)
    assert list(log.finished) == [("LiME E=8", 1e-3, 0)]

    def must_not_train():
        raise AssertionError("a finished run was trained again")

    assert log.get("LiME E=8", 1e-3, 0, must_not_train)["test"]["macro"] == 0.5
    fresh = log.get("LiME E=8", 3e-3, 0, lambda: _run("LiME E=8", 3e-3, 0, 0.7, 0.6))  # other protocol: retrained
    assert fresh["validation"]["macro"] == 0.7 and len(path.read_text().splitlines()) == 4
    assert RunLog(path, q.protocol(args), resume=True).finished.keys() == {
        ("LiME E=8", 1e-3, 0),
        ("LiME E=8", 3e-3, 0),
    }
    RunLog(path, q.protocol(args), resume=False)  # a fresh start empties the log
    assert path.read_text() == ""


def test_lr_search_breaks_near_ties_towards_the_lower_lr():
    from lime_examples.bench.quality_common import search_then_seeds

    # 12 validation items per task: 2/12 vs 3/12 in one task is one item apart; 0.1 + 1e-12 would win a float max
    val = {1e-3: {"a": 2 / 12, "b": 0.5}, 3e-3: {"a": 3 / 12, "b": 0.5 + 1e-12}}

    def run(name, lr, seed):
        report = {"macro": sum(val[lr].values()) / 2, "per_task": val[lr], "n": {"a": 12, "b": 12}}
        return {"method": name, "lr": lr, "seed": seed, "validation": report}

    assert search_then_seeds(["M"], [1e-3, 3e-3], [0], run)[1] == {"M": 1e-3}


def test_lr_search_uses_validation_of_the_first_seed_only():
    from lime_examples.bench.quality_common import lr_search_table, search_then_seeds

    # validation macro by (lr, seed): seed 0 prefers 3e-3; a later seed's validation must not enter the table
    val = {(1e-3, 0): 0.4, (3e-3, 0): 0.6, (3e-3, 1): 0.1, (3e-3, 2): 0.9}
    calls = []

    def run(name, lr, seed):
        calls.append((lr, seed))
        return _run(name, lr, seed, val[(lr, seed)], 0.5)

    runs, best = search_then_seeds(["LiME E=8"], [1e-3, 3e-3], [0, 1, 2], run)
    assert best == {"LiME E=8": 3e-3} and calls == [(1e-3, 0), (3e-3, 0), (3e-3, 1), (3e-3, 2)]
    table = lr_search_table(runs, {"LiME E=8": None}, [1e-3, 3e-3], seed=0)
    assert table[-1] == "| LiME E=8 | 0.400 | 0.600 |"
