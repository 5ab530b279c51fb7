"""Shared fixtures: where the real data lives, and skips when it is absent."""

import contextlib
import os
import signal
from pathlib import Path

# One intra-op thread per test process: on a loaded 2-core machine, two spinning OpenMP
# threads per process slow small torch workloads down by two orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESMTNET_DATA", REPO.parent / "shared" / "data"))


def data_path(*parts) -> Path:
    """Path inside the real data folder; skips the test with a reason when absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is missing (set RESMTNET_DATA to the data folder)")
    return p


@pytest.fixture
def data_dir():
    return data_path()


@pytest.fixture(autouse=True)
def _autosave_sandbox(tmp_path_factory, monkeypatch):
    """Autosaves of every test go to a temporary folder, never to the user's cache, and no
    test is asked to restore one unless it sets the policy itself."""
    monkeypatch.setenv("RESMTNET_AUTOSAVE_DIR", str(tmp_path_factory.mktemp("autosave")))
    monkeypatch.setenv("RESMTNET_AUTOSAVE_RESTORE", "never")


@contextlib.contextmanager
def hang_alarm(seconds: int):
    """Fail (not hang): a block running longer than ``seconds`` raises TimeoutError (where
    the platform has SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test ran longer than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
