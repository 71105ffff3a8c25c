"""Building peft_lime's native CPU library (csrc/*.c) on first use, once per machine.

The library holds the decoding kernel (native_route.py), the low-rank modulation with its backward
(native_low_rank.py), the training routing (native_train_route.py), the routing statistics (native_stats.py) and the
balance loss (native_balance.py). It is built with the system C compiler (``$CC``, else ``cc``) into a cache folder
(``$PEFT_LIME_CACHE``, else ``~/.cache/peft_lime``) and loaded with ctypes: no torch headers, a build takes about a
second. It is built for the host CPU (``-march=native``: the low-rank loops are vector code) and with OpenMP where the
compiler takes those flags, else without them (FLAG_SETS). The file name carries a hash of the sources, the compiler, the flags and
the CPU's identity, so an edit, another compiler or another CPU model sharing the cache folder (a network home)
builds its own file and never loads one made for other instructions.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

SOURCES = tuple(sorted(Path(__file__).with_name("csrc").glob("*.c")))
BASE_FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-fPIC", "-shared")
# Tried in order; the first that builds AND loads is used (native_route.available): host ISA with OpenMP (which
# binds to torch's own libgomp, see csrc/lime_low_rank.c), host ISA single-threaded, baseline ISA.
FLAG_SETS = (BASE_FLAGS + ("-march=native", "-fopenmp"), BASE_FLAGS + ("-march=native",), BASE_FLAGS)
LIBS = ("-lm",)


def cache_dir() -> Path:
    """Where the built library is kept."""
    configured = os.environ.get("PEFT_LIME_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "peft_lime"


@lru_cache(maxsize=1)
def cpu_identity() -> str:
    """The CPU model and its instruction-set flags (Linux), else what ``platform`` knows."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def library_path(compiler: str, flags: tuple[str, ...]) -> Path:
    """The cache file for these sources built by ``compiler`` with ``flags`` on this CPU."""
    parts = [src.read_bytes() for src in SOURCES] + [compiler.encode(), " ".join(flags).encode()]
    parts += [platform.machine().encode(), cpu_identity().encode()]
    tag = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / f"peft_lime_native-{tag}.so"


def compile_library(compiler: str, flags: tuple[str, ...]) -> Path:
    """Build the library with ``flags`` unless the cache holds it; its path. Raises when the compiler fails."""
    path = library_path(compiler, flags)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (torchrun ranks) never load half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so")
    os.close(fd)
    try:
        cmd = [compiler, *flags, *map(str, SOURCES), "-o", tmp, *LIBS]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def compiler_command() -> str:
    """The C compiler: ``$CC``, else ``cc``."""
    return os.environ.get("CC") or "cc"


def build(compiler: Optional[str] = None) -> Path:
    """The first library of FLAG_SETS that compiles (building it unless the cache holds it); raises when none does."""
    compiler = compiler or compiler_command()
    for flags in FLAG_SETS[:-1]:
        try:
            return compile_library(compiler, flags)
        except (subprocess.SubprocessError, OSError):
            continue
    return compile_library(compiler, FLAG_SETS[-1])
