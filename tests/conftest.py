"""Shared fixtures: the shipped telemetry and a scratch directory per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from detect.data import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return default_data_dir()
