"""Provenance of a benchmark run: machine description and the git commit of a checkout.

Standard library only at import time (torch and the HF libraries are imported inside ``machine_info``), with no
relative imports: ``benchmarks/layer_ops.py`` loads this file by path when PYTHONPATH points at an older checkout.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional


def _git(cwd: Path, *args: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(path: Path, tracked: Optional[str] = None) -> str:
    """``git rev-parse --short HEAD`` of the checkout holding ``path``, + "-dirty" when ``git status --porcelain``
    lists anything; "unknown" when git fails or ``path`` is in no checkout.

    ``tracked``: a file name under ``path`` that must be tracked by that checkout (so a package installed into a
    virtual environment that happens to live inside some other checkout does not report that checkout's commit).
    """
    path = Path(path)
    cwd = path if path.is_dir() else path.parent
    if not cwd.exists():
        return "unknown"
    if tracked is not None and _git(cwd, "ls-files", "--error-unmatch", tracked) is None:
        return "unknown"
    commit = _git(cwd, "rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    status = _git(cwd, "status", "--porcelain")
    return commit + ("-dirty" if status else "")


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo when available, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str = "cpu", checkout: Optional[Path] = None) -> dict[str, Any]:
    """CPU model, cores, torch threads, library versions, date, git commit of ``checkout`` (and GPU name on CUDA)."""
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if checkout is not None:
        info["commit"] = git_commit(checkout)
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
