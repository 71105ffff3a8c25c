"""Smoke run of the quality benchmark (issue 6): `--quick` exits 0 and writes complete, well-formed reports.

The numbers of a 2-step run mean nothing; what is checked is that every method trains, is scored on every task by
the closed-set rule (accuracies in [0, 1]) and reaches the report, the plot and the resumable run log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("gguf")  # the SmolLM2 backbone ships with peft-lime[demo]

pytestmark = pytest.mark.slow  # subprocess runs of the benchmarks, minutes each


def _run(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # ~1-2 min on 2 idle cores; generous for a shared machine
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _check(result: dict, methods: list[str], tasks: int) -> None:
    assert list(result["summary"]) == methods
    for run in result["runs"]:
        assert run["protocol"]["steps"] == 2 and run["trainable"] > 0
        per_task = run["test"]["per_task"]
        assert len(per_task) == tasks and all(0.0 <= v <= 1.0 for v in per_task.values())
    assert len(result["verdict"]) == len(methods) - 1


@pytest.mark.timeout(1000)
def test_quality_quick(tmp_path: Path) -> None:
    methods = ["LoRA r=8", "LiME E=8", "MixLoRA E=8 top-2 (re-implementation)"]
    _run("quality.py", tmp_path, "--methods", "LoRA r=8", "LiME E=8", "MixLoRA")
    result = json.loads((tmp_path / "quality.json").read_text())
    _check(result, methods, tasks=7)
    md = (tmp_path / "quality.md").read_text()
    assert all(f"| {m} |" in md for m in methods) and "## Verdict" in md
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert len((tmp_path / "quality_runs.jsonl").read_text().splitlines()) == len(methods)
