"""Test session setup (offline, deterministic) and shared fixtures; the tiny models are in tests/_models.py.

Tests marked `slow` (subprocesses, torchrun, benchmark / demo / example runs) are skipped by `make test-fast`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module: `pytestmark = pytest.mark.usefixtures("one_thread")`.

    Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits made them up to 50x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def native_on():
    """peft_lime's native library switched on (and loaded) for a test, the previous switch restored after it."""
    from peft_lime import native_route

    previous = native_route._enabled
    native_route.set_native(True)
    assert native_route.available()
    yield
    native_route.set_native(previous)
