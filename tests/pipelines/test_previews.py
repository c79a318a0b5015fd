"""Previews from real latents of the tiny model: JPEGs that decode, stay within their
size bounds and come at the asked steps."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from wangend.pipelines.control import JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.previews import PROJECTIONS, PreviewMaker, fit_projection
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.runtime import GenerationRuntime
from wangend.pipelines.tiny import build_tiny_pipeline
from wangend.protocol import GenerateSpec

from .conftest import RecordingHooks


def decode(preview: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(preview["data"])))
    image.load()
    return image


def test_previews_come_at_the_asked_steps_from_real_latents(
    production: ProductionManager,
) -> None:
    pipe = production.ensure(production.registry.resolve("tiny"), "float32", RecordingHooks())
    maker = PreviewMaker.for_channels(pipe.transformer.config.out_channels, every=2)
    previews: list[dict] = []

    def on_step_end(_pipe, i, _t, kwargs):  # type: ignore[no-untyped-def]
        preview = maker.maybe(i + 1, 5, kwargs["latents"])
        if preview is not None:
            previews.append(preview)
        return {}

    pipe(
        prompt="a lighthouse",
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    assert [p["step"] for p in previews] == [2, 4, 5]
    for preview in previews:
        image = decode(preview)
        assert image.format == "JPEG" and image.size == (preview["width"], preview["height"])
        assert max(image.size) == 256 and image.size[0] > image.size[1]  # 96x64 keeps its shape
        assert len(base64.b64decode(preview["data"])) <= 24 * 1024
    assert previews[0]["data"] != previews[-1]["data"]  # the latents moved


def test_a_small_job_gets_previews_no_larger_than_its_video(
    production: ProductionManager, tmp_path
) -> None:
    inputs = TaskInputManager(production.registry, "tiny", "auto")
    job = inputs.resolve(
        GenerateSpec(prompt="a kite", seed=1, steps=2, width=96, height=64, preview_every=1)
    )
    pipe = production.ensure(production.registry.resolve("tiny"), "float32", RecordingHooks())
    hooks = RecordingHooks()
    GenerationRuntime(production, tmp_path).generate_frames(pipe, job, JobControl(), hooks)
    previews = [preview for _step, preview in hooks.named("preview")]
    assert len(previews) == 2
    assert all(decode(p).size == (p["width"], p["height"]) == (96, 64) for p in previews)


def test_every_zero_means_no_previews() -> None:
    maker = PreviewMaker.for_channels(16, every=0)
    assert maker.maybe(4, 4, torch.zeros(1, 16, 3, 8, 8)) is None


def test_48_channel_latents_and_a_tight_byte_bound() -> None:
    maker = PreviewMaker.for_channels(48, every=1, max_bytes=3000)
    latents = torch.randn(1, 48, 3, 30, 52, generator=torch.Generator().manual_seed(0))
    preview = maker.maybe(1, 10, latents)
    assert preview is not None and len(base64.b64decode(preview["data"])) <= 3000
    assert decode(preview).format == "JPEG"
    with pytest.raises(ValueError, match="16 channels"):
        maker.render(torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(ValueError, match="32 latent channels"):
        PreviewMaker.for_channels(32, every=1)


def test_shipped_16_channel_table_is_the_fit_on_the_tiny_vae() -> None:
    weights, offset = PROJECTIONS[16]
    fitted = fit_projection(build_tiny_pipeline().vae)
    assert fitted.shape == (17, 3)
    # The table is printed to 4 decimals: each entry within half a unit of the last one.
    np.testing.assert_allclose(fitted[:-1], np.array(weights), rtol=0, atol=6e-5)
    np.testing.assert_allclose(fitted[-1], np.array(offset), rtol=0, atol=6e-5)
