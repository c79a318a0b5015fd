"""Shared fixtures. anyio's own pytest plugin runs the async tests (it can hold a task
group open across a fixture's yield, which pytest-asyncio cannot)."""

from collections.abc import Iterator

import pytest

from .support.harness import DaemonProcess


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A real `wangend serve` process on the tiny model, one per test module."""
    proc = DaemonProcess(tmp_path_factory.mktemp("daemon")).start()
    yield proc
    proc.stop()
