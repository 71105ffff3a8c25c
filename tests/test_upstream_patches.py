"""upstream_patches/check: the PEFT patches apply to the installed PEFT, their tests pass, and a LiME adapter loads
through entry point discovery with the patched PEFT (and fails with KeyError 'LIME' on the released one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parent.parent / "upstream_patches" / "check"


@pytest.mark.slow
def test_upstream_patches_check_passes():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(CHECK)], env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    patches = sorted(p.name for p in (CHECK.parent / "peft").glob("*.patch"))
    assert len(patches) >= 2 and patches[0].startswith("0001-") and patches[1].startswith("0002-")
    for patch in patches:
        assert f"applied {patch}" in proc.stdout
    assert "passed" in proc.stdout and " failed" not in proc.stdout
    assert "loaded with peft_lime imported by PEFT's entry point discovery" in proc.stdout
    assert "released PEFT raises KeyError('LIME')" in proc.stdout
    assert "all checks passed" in proc.stdout
