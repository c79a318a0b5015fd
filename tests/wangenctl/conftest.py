"""Fixtures the client tests share."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="wc", dir="/tmp") as d:
        yield Path(d)
