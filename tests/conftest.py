"""Shared fixtures. anyio's own pytest plugin runs the async tests (it can hold a task
group open across a fixture's yield, which pytest-asyncio cannot)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import ensure_tiny_model

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


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the tiny model, built once per session."""
    folder = tmp_path_factory.mktemp("models")
    ensure_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def registry(models_dir: Path) -> ModelRegistry:
    return ModelRegistry(models_dir)


@pytest.fixture(scope="module")
def production(registry: ModelRegistry) -> Iterator[ProductionManager]:
    """One warm tiny pipeline per module: loading it per test would dominate."""
    manager = ProductionManager(registry, device="cpu", dtype="auto", allow_download=False)
    yield manager
    manager.release()


@pytest.fixture
def runtime(production: ProductionManager, tmp_path: Path) -> GenerationRuntime:
    return GenerationRuntime(production, tmp_path / "out")
