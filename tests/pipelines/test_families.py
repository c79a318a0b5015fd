"""Every Wan family end to end on its tiny model: a job through GenerationRuntime gives
exactly what the diffusers pipeline gives when called directly with the same components,
seed and arguments; pause and abort hold on the two-expert model; bad jobs are refused at
enqueue with the field named."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

from wangend.errors import InvalidParams
from wangend.pipelines.calls import scheduler_for
from wangend.pipelines.control import JobAborted, JobControl
from wangend.pipelines.inputs import TaskInputManager
from wangend.pipelines.production import ProductionManager
from wangend.pipelines.registry import ModelRegistry
from wangend.pipelines.runtime import GenerationRuntime, to_uint8
from wangend.protocol import GenerateSpec, ResolvedGenerate

from ..support.outputs import write_clip
from .conftest import RecordingHooks

SIZE, FRAMES, STEPS = 32, 5, 2


def noise_image(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mp4(path: Path, frames: int, seed: int, grey: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, SIZE, SIZE, 1 if grey else 3), np.uint8)
    return write_clip(path, np.repeat(pixels, 3, axis=3) if grey else pixels)


def decode(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    broken = folder / "broken.png"
    broken.write_bytes(noise_image(folder / "x.png", 9).read_bytes()[:60])
    return {
        "image": noise_image(folder / "start.png", 1),
        "last_image": noise_image(folder / "end.png", 2),
        "ref": noise_image(folder / "ref.png", 3),
        "video": write_mp4(folder / "source.mp4", FRAMES, 4),
        "mask": write_mp4(folder / "mask.mp4", FRAMES, 5, grey=True),
        "broken": broken,
        "text": folder / "notes.txt",
    }


@pytest.fixture(scope="module")
def family_registry(family_models: Path) -> ModelRegistry:
    return ModelRegistry(family_models)


@pytest.fixture(scope="module")
def inputs(family_registry: ModelRegistry) -> TaskInputManager:
    return TaskInputManager(family_registry, "tiny", "auto")


@pytest.fixture(scope="module")
def family_runtime(family_registry: ModelRegistry, tmp_path_factory) -> GenerationRuntime:
    production = ProductionManager(family_registry, device="cpu", allow_download=False)
    yield GenerationRuntime(production, tmp_path_factory.mktemp("out"))
    production.release()


def spec(model: str, media: dict[str, Path], **fields: Any) -> GenerateSpec:
    paths = {k: str(media[v]) if isinstance(v, str) else [str(media[x]) for x in v]
             for k, v in fields.items()}  # fmt: skip
    return GenerateSpec(
        prompt="a red fox runs through snow", model=model, seed=77, width=SIZE, height=SIZE,
        frames=FRAMES, steps=STEPS, **paths,
    )  # fmt: skip


def direct(folder: Path, cls_name: str, job: ResolvedGenerate, **task: Any) -> np.ndarray:
    """diffusers itself, on a pipeline of its own loaded from the same folder."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_for(pipe.scheduler, job.flow_shift)
    text = diffusers.WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
        scheduler=pipe.scheduler,
    )  # fmt: skip
    with torch.no_grad():
        positive, negative = text.encode_prompt(
            job.prompt, job.negative_prompt, max_sequence_length=512, device="cpu"
        )
    if job.boundary_ratio is not None:
        task["guidance_scale_2"] = job.guidance_scale_2
    frames = pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        height=job.height,
        width=job.width,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(job.seed),
        output_type="np",
        **task,
    ).frames[0]
    return to_uint8(np.asarray(frames))


def generate(runtime: GenerationRuntime, job: ResolvedGenerate, control=None, hooks=None):
    record = runtime.production.registry.resolve(job.model)
    pipe = runtime.production.ensure(record, job.dtype, RecordingHooks())
    return runtime.generate_frames(pipe, job, control or JobControl(), hooks or RecordingHooks())


def task_args(fields: dict[str, Any], media: dict[str, Path]) -> dict[str, Any]:
    """What a direct diffusers call gets for the job's media, read here independently
    (the files are already the job's size and length, so no resizing is involved)."""
    args: dict[str, Any] = {}
    if "image" in fields:
        args["image"] = Image.open(media["image"]).convert("RGB")
    if "last_image" in fields:
        args["last_image"] = Image.open(media["last_image"]).convert("RGB")
    if "video" in fields:
        args["video"] = decode(media["video"])
    if "mask" in fields:
        args["mask"] = [f.convert("L").convert("RGB") for f in decode(media["mask"])]
    if "reference_images" in fields:
        args["reference_images"] = [Image.open(media["ref"]).convert("RGB")]
    return args


VACE_MEDIA = {"video": "video", "mask": "mask", "reference_images": ["ref"]}
CASES = [  # model, job media, the diffusers class called directly
    ("tiny", {"video": "video"}, "WanVideoToVideoPipeline"),
    ("tiny-i2v", {"image": "image"}, "WanImageToVideoPipeline"),
    ("tiny-vace", VACE_MEDIA, "WanVACEPipeline"),
    ("tiny-wan22", {}, "WanPipeline"),
    ("tiny-wan22-i2v", {"image": "image", "last_image": "last_image"}, "WanImageToVideoPipeline"),
    ("tiny-ti2v", {}, "WanPipeline"),
    ("tiny-ti2v", {"image": "image"}, "WanImageToVideoPipeline"),
]


@pytest.mark.parametrize(("model", "fields", "cls_name"), CASES)
def test_runtime_equals_diffusers(family_runtime, inputs, media, model, fields, cls_name):
    job = inputs.resolve(spec(model, media, **fields))
    frames = generate(family_runtime, job)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8
    task = task_args(fields, media)
    if cls_name == "WanVideoToVideoPipeline":
        task["strength"] = 0.8
    else:
        task["num_frames"] = FRAMES
    assert np.array_equal(frames, direct(Path(job.source), cls_name, job, **task))
    if model in {"tiny-vace", "tiny-ti2v"} and fields:  # media optional: it must matter
        plain = inputs.resolve(spec(model, media))
        assert not np.array_equal(generate(family_runtime, plain), frames)


def test_jobs_record_family_media_and_hashes(inputs, media) -> None:
    import hashlib

    job = inputs.resolve(spec("tiny-vace", media, **VACE_MEDIA))
    assert job.family == "wan2.1-vace" and job.video == str(media["video"])
    assert job.reference_images == [str(media["ref"])]
    want = hashlib.sha256(media["mask"].read_bytes()).hexdigest()
    assert job.inputs_sha256["mask"] == want
    assert set(job.inputs_sha256) == {"video", "mask", "reference_images[0]"}
    assert job.strength is None and job.guidance_scale_2 is None and job.boundary_ratio is None
    v2v = inputs.resolve(spec("tiny", media, video="video"))
    assert v2v.strength == 0.8 and v2v.family == "wan2.1-t2v"
    two = inputs.resolve(spec("tiny-wan22", media))
    assert (two.boundary_ratio, two.guidance_scale_2) == (0.875, two.guidance_scale)


def test_both_experts_run_and_boundary_moves_the_switch(family_runtime, inputs, media) -> None:
    job = inputs.resolve(spec("tiny-wan22", media))
    record = family_runtime.production.registry.resolve(job.model)
    pipe = family_runtime.production.ensure(record, job.dtype, RecordingHooks())
    calls = {"transformer": 0, "transformer_2": 0}
    handles = [
        getattr(pipe, name)
        .blocks[0]
        .register_forward_hook(lambda *_a, n=name: calls.__setitem__(n, calls[n] + 1))
        for name in calls
    ]
    try:
        family_runtime.generate_frames(pipe, job, JobControl(), RecordingHooks())
        assert calls == {"transformer": 2, "transformer_2": 2}  # 2 steps x (cond, uncond)
        calls.update(transformer=0, transformer_2=0)
        late = msgspec_replace(job, boundary_ratio=0.5)
        family_runtime.generate_frames(pipe, late, JobControl(), RecordingHooks())
        assert calls == {"transformer": 4, "transformer_2": 0}
    finally:
        for handle in handles:
            handle.remove()
    assert pipe.config.boundary_ratio == 0.875  # the warm pipeline was not changed


def msgspec_replace(job: ResolvedGenerate, **changes: Any) -> ResolvedGenerate:
    import msgspec

    return msgspec.structs.replace(job, **changes)


def test_pause_on_two_experts_resumes_identically(family_runtime, inputs, media, hooks) -> None:
    job = inputs.resolve(spec("tiny-wan22", media))
    reference = generate(family_runtime, job)
    control = JobControl()
    control.request_pause()
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(value=generate(family_runtime, job, control, hooks)),
        daemon=True,
    )
    thread.start()
    assert hooks.paused_event.wait(30)
    thread.join(0.2)
    assert thread.is_alive() and hooks.named("paused") == [(1, STEPS)]
    control.release_pause()
    thread.join(30)
    assert hooks.named("resumed") == [(1, STEPS)]
    assert np.array_equal(result["value"], reference)


def test_abort_inside_the_second_expert(family_runtime, inputs, media, hooks) -> None:
    job = inputs.resolve(spec("tiny-wan22", media))
    record = family_runtime.production.registry.resolve(job.model)
    pipe = family_runtime.production.ensure(record, job.dtype, RecordingHooks())
    control = JobControl()
    after: list[bool] = []

    def on_block(module, args, output) -> None:
        after.append(control.aborted)
        control.request_abort()  # during the low-noise expert's first block

    handles = [b.register_forward_hook(on_block) for b in pipe.transformer_2.blocks]
    try:
        with pytest.raises(JobAborted):
            family_runtime.generate_frames(pipe, job, control, hooks)
    finally:
        for handle in handles:
            handle.remove()
    assert after == [False]  # not one more block of transformer_2 ran
    assert "decoding" not in [phase for *_, phase in hooks.named("progress")]
    assert not any(m._forward_pre_hooks for m in pipe.transformer_2.blocks)


def test_abort_during_image_encoding(family_runtime, inputs, media, hooks) -> None:
    job = inputs.resolve(spec("tiny-i2v", media, image="image"))
    record = family_runtime.production.registry.resolve(job.model)
    pipe = family_runtime.production.ensure(record, job.dtype, RecordingHooks())
    control = JobControl()
    seen: list[str] = []
    layers = [
        m for n, m in pipe.image_encoder.named_modules() if n.endswith(("layers.0", "layers.1"))
    ]
    handles = [
        layers[0].register_forward_hook(lambda *_: (seen.append("clip0"), control.request_abort()))
    ]
    handles += [layers[1].register_forward_hook(lambda *_: seen.append("clip1"))]
    handles += [pipe.transformer.blocks[0].register_forward_hook(lambda *_: seen.append("block"))]
    try:
        with pytest.raises(JobAborted):
            family_runtime.generate_frames(pipe, job, control, hooks)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == ["clip0"]


@pytest.mark.parametrize(
    ("model", "fields", "field", "words"),
    [
        ("tiny", {"image": "image"}, "image", ("does not take", "tiny-i2v", "wan2.2-i2v-a14b")),
        ("tiny-i2v", {}, "image", ("needs",)),
        ("tiny-i2v", {"image": "image", "last_image": "last_image"}, "last_image", ("a14b",)),
        ("tiny-wan22", {"video": "video"}, "video", ("tiny-vace", "wan2.1-t2v-1.3b")),
        ("tiny-i2v", {"image": "missing"}, "image", ("does not exist",)),
        ("tiny-i2v", {"image": "broken"}, "image", ("not a readable image", "broken.png")),
        ("tiny-i2v", {"image": "video"}, "image", ("is a video",)),
        ("tiny", {"video": "text"}, "video", ("notes.txt",)),
        ("tiny-vace", {"mask": "mask"}, "mask", ("give `video`",)),
        ("tiny-vace", {"video": "video", "reference_images": ["ref", "broken"]},
         "reference_images[1]", ("broken.png",)),
    ],
)  # fmt: skip
def test_refused_at_enqueue(inputs, media, model, fields, field, words) -> None:
    media = {**media, "missing": media["image"].parent / "absent.png"}
    (media["text"]).write_text("not a video")
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(spec(model, media, **fields))
    assert info.value.field == f"$.params.{field}"
    assert all(w in info.value.message for w in words), info.value.message


def test_bad_frames_and_sizes_per_family(inputs, media) -> None:
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(msgspec_replace_spec(spec("tiny-wan22", media), frames=6))
    assert info.value.field == "$.params.frames" and "5 or 9" in info.value.message
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(msgspec_replace_spec(spec("tiny-ti2v", media), width=48))
    assert info.value.field == "$.params.width" and "multiple of 32" in info.value.message
    with pytest.raises(InvalidParams) as info:
        inputs.resolve(msgspec_replace_spec(spec("tiny", media, video="video"), strength=0.2))
    assert info.value.field == "$.params.strength"


def msgspec_replace_spec(s: GenerateSpec, **changes: Any) -> GenerateSpec:
    import msgspec

    return msgspec.structs.replace(s, **changes)


def test_video_to_video_progress_counts_skipped_steps(family_runtime, inputs, media, hooks):
    job = inputs.resolve(msgspec_replace_spec(spec("tiny", media, video="video"), steps=4))
    assert job.strength == 0.8  # int(4 * 0.8) = 3 steps run, the first is skipped
    generate(family_runtime, job, hooks=hooks)
    denoising = [(s, n) for s, n, phase in hooks.named("progress") if phase == "denoising"]
    assert denoising == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_conditioning_is_sized_for_the_job(media, tmp_path) -> None:
    from wangend.pipelines.conditioning import load_image, load_video, probe, sample_indices

    wide = noise_image(tmp_path / "wide.png", 11, size=(80, 48))
    image = load_image(wide, 32, 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert sample_indices(10, 5) == [0, 2, 4, 7, 9] and sample_indices(2, 5) == [0, 0, 0, 1, 1]
    frames = load_video(media["video"], 16, 32, 9)
    assert len(frames) == 9 and {f.size for f in frames} == {(16, 32)}
    info = probe(media["video"])
    assert (info.kind, info.width, info.height, info.frames) == ("video", SIZE, SIZE, FRAMES)
