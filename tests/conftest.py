"""Shared fixtures. anyio's own pytest plugin runs the async tests (it can hold a task
group open across a fixture's yield, which pytest-asyncio cannot)."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
