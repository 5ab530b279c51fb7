"""Shared fixtures: where the real data lives, and skips when it is absent."""
import os
from pathlib import Path

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
def _torch_threads():
    """Keep tests from oversubscribing small CI machines (only where torch is in use: this
    fixture does not import it, so Qt-only tests keep their import order)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
