"""Specs resolve to complete, valid jobs; a wrong field is named in the error."""

from __future__ import annotations

import hashlib
import os
import wave
from datetime import datetime
from pathlib import Path

import msgspec
import pytest

from wangend.errors import InvalidParams, ModelUnavailable
from wangend.pipelines.inputs import (
    DEFAULT_OUTPUT_NAME,
    TaskInputManager,
    check_output_name,
    render_output_name,
)
from wangend.pipelines.registry import ModelRegistry
from wangend.protocol import GenerateSpec


@pytest.fixture
def inputs(tmp_path: Path) -> TaskInputManager:
    return TaskInputManager(ModelRegistry(tmp_path / "models"), "tiny", "float32")


def test_defaults_come_from_the_model(inputs: TaskInputManager) -> None:
    job = inputs.resolve(GenerateSpec(prompt="a fox"))
    assert (job.model, job.width, job.height, job.frames, job.steps, job.fps) == (
        "tiny",
        64,
        64,
        9,
        4,
        8,
    )
    assert (job.guidance_scale, job.flow_shift, job.dtype) == (5.0, 3.0, "float32")
    assert job.output_name == DEFAULT_OUTPUT_NAME and job.source.endswith("tiny")
    assert 0 <= job.seed < 2**32
    # The seed is chosen once and recorded: the frozen job carries it.
    assert msgspec.json.decode(msgspec.json.encode(job), type=type(job)) == job

    big = inputs.resolve(GenerateSpec(prompt="a fox", model="wan2.1-t2v-14b"))
    assert (big.width, big.height, big.frames, big.steps, big.flow_shift) == (
        1280,
        720,
        81,
        50,
        5.0,
    )
    assert big.negative_prompt  # the model's default negative prompt


def test_given_values_win(inputs: TaskInputManager) -> None:
    spec = GenerateSpec(
        prompt="p",
        width=128,
        height=32,
        frames=13,
        steps=2,
        guidance_scale=1.0,
        seed=5,
        fps=24,
        flow_shift=7.0,
        negative_prompt="",
        output_name="{prompt}-{seed}",
    )
    job = inputs.resolve(spec)
    assert (job.width, job.height, job.frames, job.steps, job.seed, job.fps) == (
        128,
        32,
        13,
        2,
        5,
        24,
    )
    assert (job.guidance_scale, job.flow_shift, job.negative_prompt) == (1.0, 7.0, "")


@pytest.mark.parametrize(
    ("change", "field", "hints"),
    [
        ({"width": 100}, "$.params.width", ("96", "112")),
        ({"height": 24}, "$.params.height", ("16", "32")),
        ({"width": 17}, "$.params.width", ("16", "32")),
        ({"frames": 10}, "$.params.frames", ("9", "13")),
        ({"frames": 2}, "$.params.frames", ("1", "5")),
    ],
)
def test_bad_sizes_name_the_field_and_suggest(
    inputs: TaskInputManager, change: dict, field: str, hints: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(GenerateSpec(prompt="p", **change))
    assert info.value.field == field and info.value.data["field"] == field
    assert all(h in info.value.message for h in hints)


def test_unknown_model(inputs: TaskInputManager) -> None:
    with pytest.raises(ModelUnavailable, match="unknown model 'nope'"):
        inputs.resolve(GenerateSpec(prompt="p", model="nope"))


@pytest.mark.parametrize(
    "template",
    [
        "../up",
        "a/b",
        "/abs",
        "a\\b",
        "x\x01y",
        "x\ny",
        ".hidden",
        "~home",
        "{nope}",
        "{seed.__class__}",
        "{seed!r}",
        "{seed:>10}",
        "{",
        "{0}",
        "{}",
    ],
)
def test_bad_output_names(inputs: TaskInputManager, template: str) -> None:
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(GenerateSpec(prompt="p", output_name=template))
    assert info.value.field == "$.params.output_name"


def test_render_output_name(inputs: TaskInputManager) -> None:
    template = "{job}_{model}_{seed}_{steps}x{frames}_{prompt}_{date}"
    check_output_name(template)
    job = inputs.resolve(
        GenerateSpec(
            prompt="Ein Fuchs / im Schnee: 日本語 ../../etc " * 3, seed=42, output_name=template
        )
    )
    stem = render_output_name(job.output_name, job_id=7, job=job, now=datetime(2025, 1, 2, 3, 4, 5))
    assert stem.startswith("7_tiny_42_4x9_Ein-Fuchs-im-Schnee-日本語")
    assert stem.endswith("_20250102-030405")
    assert "/" not in stem and ".." not in stem and " " not in stem
    hub = msgspec.structs.replace(job, model="org/Some Model", output_name="{model}")
    assert render_output_name(hub.output_name, job_id=1, job=hub) == "Some-Model"
    long = msgspec.structs.replace(job, output_name="x" * 250)
    assert len(render_output_name(long.output_name, job_id=1, job=long).encode()) <= 180


def test_engine_and_metadata_defaults(tmp_path: Path) -> None:
    from wangend.config import EngineConfig

    engine = EngineConfig(memory_profile="group", fp8=True, step_cache="fbc", preview_every=2)
    inputs = TaskInputManager(
        ModelRegistry(tmp_path / "models"), "tiny", engine=engine, metadata_default="json"
    )
    job = inputs.resolve(GenerateSpec(prompt="p"))
    assert (job.memory_profile, job.fp8, job.step_cache, job.preview_every) == (
        "group",
        True,
        "fbc",
        2,
    )
    assert (job.attention, job.compile, job.metadata, job.family) == (
        "native",
        False,
        "json",
        "wan2.1-t2v",
    )
    own = inputs.resolve(GenerateSpec(prompt="p", fp8=False, metadata="none", step_cache="none"))
    assert (own.fp8, own.metadata, own.step_cache) == (False, "none", "none")
    plain = TaskInputManager(ModelRegistry(tmp_path / "models"), "tiny").resolve(
        GenerateSpec(prompt="p")
    )
    assert (plain.memory_profile, plain.metadata, plain.image, plain.inputs_sha256) == (
        "none", "embedded", None, {},
    )  # fmt: skip


def write_wav(path: Path, seconds: float = 0.25, rate: int = 8000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x10" * int(seconds * rate))
    return path


def write_clip(path: Path, *, sound: bool) -> Path:
    """Four 32x32 frames, with a quiet mono track when `sound`."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=8)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("pcm_s16le", rate=8000) if sound else None
        if audio is not None:
            audio.layout = "mono"
        for i in range(4):
            picture = np.full((32, 32, 3), 60 * i, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(video.encode(None))
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 4000), np.int16), layout="mono")
            frame.sample_rate = 8000
            out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    return path


def test_audio_path(inputs: TaskInputManager, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(GenerateSpec(prompt="p", audio=str(tmp_path / "none.wav")))
    assert info.value.field == "$.params.audio" and "none.wav" in info.value.message
    assert "does not exist" in info.value.message
    write_wav(tmp_path / "a.wav")
    monkeypatch.chdir(tmp_path)
    job = inputs.resolve(GenerateSpec(prompt="p", audio="a.wav"))
    assert job.audio == str(tmp_path / "a.wav")
    assert (
        job.inputs_sha256["audio"] == hashlib.sha256((tmp_path / "a.wav").read_bytes()).hexdigest()
    )


def test_audio_must_decode_and_have_sound(inputs: TaskInputManager, tmp_path: Path) -> None:
    """A text file named .wav was once queued; the job "succeeded" with a silent video and
    only the daemon's log said why. Now it is refused at enqueue, like any media."""
    fake = tmp_path / "notaudio.wav"
    fake.write_text("this is not audio\n")
    silent = write_clip(tmp_path / "silent.mkv", sound=False)
    for path, words in (
        (fake, f"audio: {fake} is not a readable audio file or video (Invalid data found"),
        (silent, "is a video without sound; give an audio file or a video with sound"),
    ):
        with pytest.raises(InvalidParams) as info:
            inputs.resolve(GenerateSpec(prompt="p", audio=str(path)))
        assert info.value.field == "$.params.audio"
        assert words in info.value.message, info.value.message
        assert "Errno" not in info.value.message and f"'{path}'" not in info.value.message
    with_sound = write_clip(tmp_path / "sound.mkv", sound=True)
    assert inputs.resolve(GenerateSpec(prompt="p", audio=str(with_sound))).audio == str(with_sound)


def test_what_is_not_a_regular_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    inputs = TaskInputManager(ModelRegistry(tmp_path / "models"), "tiny-i2v")
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    for path, what in (
        ("/dev/zero", "is a character device, not a regular file"),
        (str(pipe), "is a named pipe (FIFO), not a regular file"),
        (str(tmp_path), "is a directory, not a regular file"),
    ):
        with pytest.raises(InvalidParams) as info:
            inputs.resolve(GenerateSpec(prompt="p", image=path))
        assert info.value.field == "$.params.image"
        assert info.value.message == f"image: {path} {what}"


def test_a_media_error_reads_without_errno_noise(tmp_path: Path) -> None:
    inputs = TaskInputManager(ModelRegistry(tmp_path / "models"), "tiny")
    fake = tmp_path / "clip.mp4"
    fake.write_text("not a video")
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(GenerateSpec(prompt="p", video=str(fake)))
    assert info.value.field == "$.params.video"
    assert info.value.message == (
        f"video: {fake} is not a readable video (Invalid data found when processing input)"
    )


def test_retry_asking_for_an_enhanced_prompt_needs_an_enhancer(
    inputs: TaskInputManager,
) -> None:
    with pytest.raises(InvalidParams) as info:
        inputs.check_enhance("$.params.enhance")
    assert info.value.field == "$.params.enhance"
    assert info.value.message.startswith("enhance needs a prompt enhancer")


def test_relative_media_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    Image.new("RGB", (80, 48), (10, 200, 30)).save(tmp_path / "start.png")
    monkeypatch.chdir(tmp_path)
    inputs = TaskInputManager(ModelRegistry(tmp_path / "models"), "tiny-i2v")
    job = inputs.resolve(GenerateSpec(prompt="p", image="start.png"))
    assert job.image == str(tmp_path / "start.png") and job.family == "wan2.1-i2v"
    assert len(job.inputs_sha256["image"]) == 64
