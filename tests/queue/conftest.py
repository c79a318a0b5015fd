"""Fixtures for the queue: a store on a real SQLite file, and the real generation side
(tiny model, warm pipeline shared by the module's tests) for the controller."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
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


@pytest.fixture
def inputs(registry: ModelRegistry, production: ProductionManager) -> TaskInputManager:
    return TaskInputManager(registry, "tiny", production.dtype_name)
