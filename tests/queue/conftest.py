"""Fixtures for the queue: a store on a real SQLite file, and the real generation side
(tiny model, warm pipeline shared by the module's tests) for the controller."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import ensure_tiny_model
from wangend.protocol import ResolvedGenerate
from wangend.queue.store import JobStore


def make_spec(prompt: str = "a heron over a pond", seed: int = 1) -> ResolvedGenerate:
    """A resolved job as the inputs manager would make it; the store never runs it."""
    return ResolvedGenerate(
        model="tiny",
        source="/models/tiny",
        prompt=prompt,
        negative_prompt="",
        width=64,
        height=64,
        frames=9,
        steps=4,
        guidance_scale=5.0,
        seed=seed,
        fps=8,
        flow_shift=3.0,
        output_name="{job}_{seed}",
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[JobStore]:
    with JobStore(db_path) as s:
        yield s


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("queue-models")
    ensure_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def registry(models_dir: Path) -> ModelRegistry:
    return ModelRegistry(models_dir)


@pytest.fixture(scope="module")
def production(registry: ModelRegistry) -> Iterator[ProductionManager]:
    """One warm tiny pipeline for the module: loading it per test would dominate."""
    manager = ProductionManager(registry, device="cpu", dtype="auto", allow_download=False)
    yield manager
    manager.release()


@pytest.fixture
def runtime(production: ProductionManager, tmp_path: Path) -> GenerationRuntime:
    return GenerationRuntime(production, tmp_path / "out")


@pytest.fixture
def inputs(registry: ModelRegistry, production: ProductionManager) -> TaskInputManager:
    return TaskInputManager(registry, "tiny", production.dtype_name)
