"""Fixtures for the adapter tests: the project's tiny Wan pipeline, loaded once per module
from the session's models folder, and tiny LoRA files written in each key layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .lora_files import write_lora


@pytest.fixture(scope="module")
def tiny_pipe(models_dir: Path) -> Iterator[object]:
    """The tiny pipeline, run on one torch thread: on a shared 2-core machine a second
    thread spinning against other processes makes these toy matmuls 10-20x slower."""
    from diffusers import WanPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = WanPipeline.from_pretrained(
        models_dir / "tiny", use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA root with a `wan_tiny` folder holding one LoRA per layout."""
    root = tmp_path_factory.mktemp("loras")
    folder = root / "wan_tiny"
    folder.mkdir()
    write_lora(folder / "peft.safetensors", "diffusers", seed=1)
    write_lora(folder / "orig.safetensors", "wan", seed=2)
    write_lora(folder / "kohya.safetensors", "kohya", seed=3)
    write_lora(folder / "alt.safetensors", "diffusers", seed=4)
    return root


def run_tiny(pipe: object, steps: int = 3, callback=None) -> torch.Tensor:
    """One short, seeded generation; returns the decoded frames."""
    kwargs = {}
    if callback is not None:
        kwargs = {"callback_on_step_end": callback}
    out = pipe(  # type: ignore[operator]
        prompt="a red fox in the snow",
        negative_prompt="",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pt",
        **kwargs,
    )
    return out.frames
