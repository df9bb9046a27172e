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


@pytest.fixture(autouse=True)
def _no_leaked_ultralytics_pil_patch():
    """Tests that import ultralytics directly must not leak its process-wide PIL.Image.open patch
    (pip-installs pi-heif on unreadable images) into later tests in the same worker."""
    yield
    import sys

    if "ultralytics.utils.patches" in sys.modules:
        from detection.train import restore_pil_open

        restore_pil_open()
