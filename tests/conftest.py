"""Shared fixtures: the real datasets in ../shared/data (read-only) and the repository's configs."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}: clone the repo beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="session")
def aquarium(shared_data: Path) -> Path:
    return shared_data / "aquarium"


@pytest.fixture(scope="session")
def seals(shared_data: Path) -> Path:
    return shared_data / "glacierbay-seals"


@pytest.fixture(scope="session")
def geo(shared_data: Path) -> Path:
    return shared_data / "geo"


@pytest.fixture(scope="session")
def configs() -> Path:
    return CONFIGS
