"""Fixtures for the generation side: one tiny model per session, hooks that record."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from wangend.pipelines.tiny import TINY_NAMES, ensure_tiny_model


class RecordingHooks:
    """A RunHooks that records every call, in order, and signals pauses to the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.paused_event = threading.Event()
        self.on_progress = None  # optional callable(step, steps, phase), runs on the worker

    def progress(
        self, step: int, steps: int, phase: str, preview: dict[str, Any] | None = None
    ) -> None:
        self.calls.append(("progress", (step, steps, phase)))
        if preview is not None:
            self.calls.append(("preview", (step, preview)))
        if self.on_progress is not None:
            self.on_progress(step, steps, phase)

    def paused(self, step: int, steps: int) -> None:
        self.calls.append(("paused", (step, steps)))
        self.paused_event.set()

    def resumed(self, step: int, steps: int) -> None:
        self.calls.append(("resumed", (step, steps)))

    def model_loading(self, model: str, data: dict[str, Any]) -> None:
        self.calls.append(("model_loading", (model, data)))

    def model_loaded(self, model: str, data: dict[str, Any]) -> None:
        self.calls.append(("model_loaded", (model, data)))

    def spec_changed(self, spec: Any) -> None:
        self.calls.append(("spec_changed", (spec,)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for kind, args in self.calls if kind == name]


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture(scope="session")
def family_models(models_dir: Path) -> Path:
    """The session's models directory with every tiny family built into it (~1 s)."""
    for name in TINY_NAMES:
        ensure_tiny_model(models_dir, name=name)
    return models_dir
