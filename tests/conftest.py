"""Shared fixtures: the script imported as a module, and where the shared challenge data lives (if present)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tokenizers").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
