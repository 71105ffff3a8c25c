"""Where a static-routing export may write: one directory per profile inside the output directory, nowhere else.

A profile name becomes a directory name, so it must be exactly one plain path component: with a profile named "..",
``--output-dir my-adapter/exported`` wrote into my-adapter itself and replaced its adapter_config.json and weights.
Existing adapters are replaced only when asked (``overwrite``), and then whole: a stale file left beside the new
config and weights (an adapter_model.bin, say) would be read as part of the new adapter.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Written by every export beside the profile directories: what was exported from what (see export._export_all).
MANIFEST_NAME = "lime_export.json"


def profile_dir(output_dir: Path, name: Any) -> Path:
    """``output_dir / name``; ValueError unless ``name`` is one plain directory name that stays inside output_dir."""
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
        and not os.path.isabs(name)
        and Path(name).name == name
    )
    if not plain:
        raise ValueError(
            f"profiles: {name!r} is not usable as a directory name (one path component: not empty, '.' or '..', "
            "no '/', '\\' or NUL)"
        )
    target = output_dir / name
    if target.is_symlink():
        raise ValueError(f"profiles: {target} is a symbolic link; an export does not write through links")
    root = output_dir.resolve()
    if target.resolve().parent != root:  # defence in depth: the checks above should make this impossible
        raise ValueError(f"profiles: {name!r} resolves to {target.resolve()}, outside output_dir {root}")
    return target


def check_targets(output_dir: Path, names: Iterable[Any], overwrite: bool) -> dict[str, Path]:
    """{profile name: its directory}, refusing bad names and, unless ``overwrite``, anything already there."""
    targets = {name: profile_dir(output_dir, name) for name in names}
    manifest = output_dir / MANIFEST_NAME
    if manifest.is_symlink():
        raise ValueError(f"output_dir: {manifest} is a symbolic link; an export does not write through links")
    existing = [str(p) for p in [*targets.values(), manifest] if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"output_dir: {', '.join(existing)} already exist(s); an export does not overwrite files unless asked "
            "(overwrite=True in Python, --overwrite on the command line), and then replaces each profile directory "
            "whole"
        )
    return targets


def write_replacing(target: Path, write: Callable[[Path], None]) -> Path:
    """Have ``write(directory)`` fill a staging directory beside ``target``, then put it in place of ``target``.

    A failed write leaves a previous ``target`` as it was; a replaced one keeps none of its old files.
    """
    # mkdir, not tempfile.mkdtemp: the exported directory gets the umask's permissions, not mkdtemp's 0700.
    staging = target.parent / f".{target.name}.{secrets.token_hex(6)}.partial"
    staging.mkdir()
    try:
        write(staging)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
