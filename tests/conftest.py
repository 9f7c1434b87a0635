"""Fixtures shared by all tests: the default checkpoint and its engine arguments."""

import sys
from pathlib import Path

import pytest

from hetserve import names
from hetserve.checkpoint import default_model_path
from hetserve.launcher import ServeOptions, engine_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # engine_runner


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def engine_args(model_path) -> dict:
    """The engines' arguments as `hetserve serve` runs them (model resolved)."""
    return engine_settings(ServeOptions(), names.Model.LLM)
