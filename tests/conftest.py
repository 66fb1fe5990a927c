"""Shared fixtures: repository paths and small deterministic model builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and a small thread count (2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
