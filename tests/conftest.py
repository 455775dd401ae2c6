"""Shared fixtures: the tiny SD1 model and the procedural sample dataset."""

import copy
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lohatrain.demo import build_tiny_sd1, make_sample_dataset  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_model_template():
    return build_tiny_sd1(0)


@pytest.fixture
def tiny_model(_tiny_model_template):
    """A fresh `build_tiny_sd1(0)` per test (a deep copy: tests may train or patch it)."""
    return copy.deepcopy(_tiny_model_template)


@pytest.fixture
def sample_dataset(tmp_path):
    """The built-in demo dataset (8 PNGs with .txt captions) in a temporary folder."""
    return make_sample_dataset(tmp_path / "dataset")
