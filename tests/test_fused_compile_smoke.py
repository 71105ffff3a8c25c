"""`python benchmarks/fused_compile.py` (compile cost of the fused routing region) runs and reports every phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fused_compile_benchmark_runs_with_one_graph(tmp_path: Path) -> None:
    """One layer: the region is compiled once (one graph) and no later phase (new shapes, eval, decode) adds a graph;
    the report lists every call and is written with the command."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "benchmarks/fused_compile.py", "--layers", "1", "--threads", "1", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "fused_compile.json").read_text())
    assert [r["graphs"] for r in result["rows"]] == [1] * 10
    assert result["rows"][0]["seconds"] > result["rows"][1]["seconds"]  # the first train step compiles
    text = (tmp_path / "fused_compile.md").read_text()
    assert all(f"| {r['call']} |" in text for r in result["rows"])
    assert "python benchmarks/fused_compile.py --layers 1" in text and "Compile cost" in text
