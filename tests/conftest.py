"""Make the bundle's ``scripts`` package importable as MONAI does after ``initialize``."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo data set (48³ volumes) shared by the data, engine and bundle tests; returns its dataset.json."""
    from scripts.data.demo_data import make_demo_dataset

    directory = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(directory, num_training=6, num_validation=2, num_test=2, shape=(48, 48, 48))
