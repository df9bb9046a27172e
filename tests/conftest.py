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


def _aquarium_chips(aquarium: Path, out: Path, labels=("fish", "penguin", "puffin", "stingray"), per_label: int = 6,
                    size: int = 32) -> Path:
    """A small real chips folder (detection.chips) of a few aquarium train labels, with taxonomy.json."""
    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips

    ds = read_dataset(aquarium, splits=["train"])
    ds.boxes = ds.boxes[ds.boxes.label.isin(labels)]
    make_chips(ds, out, ChipConfig(size=size, max_per_class=per_label), taxonomy=CONFIGS / "taxonomy/aquarium.csv",
               split="train", progress=False)
    return out


@pytest.fixture(scope="session")
def aquarium_chips(aquarium: Path):
    """`aquarium_chips(out, labels=..., per_label=6, size=32)`: cut real aquarium chips into `out`."""
    return lambda out, **kw: _aquarium_chips(aquarium, out, **kw)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket lookup and connect fails, as on an offline machine."""
    import socket

    def deny(*a, **k):
        raise OSError("network denied in test")

    monkeypatch.setattr(socket, "getaddrinfo", deny)
    monkeypatch.setattr(socket.socket, "connect", deny)


@pytest.fixture(autouse=True)
def _no_leaked_ultralytics_pil_patch():
    """Tests that import ultralytics directly must not leak its process-wide PIL.Image.open patch
    (pip-installs pi-heif on unreadable images) into later tests in the same worker."""
    yield
    import sys

    if "ultralytics.utils.patches" in sys.modules:
        from detection.train import restore_pil_open

        restore_pil_open()
