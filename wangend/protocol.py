"""Every type that crosses the wire, defined once.

The daemon and `wangenctl` both import this module, so it holds no I/O and imports
nothing heavy (no torch, no sockets). Each request's params decode straight into one of
the Structs below with msgspec; a bad field is reported with its path (`$.steps`).

Wire format: JSON-RPC 2.0, one compact JSON text per line (NDJSON). Events are
notifications `{"jsonrpc": "2.0", "method": "event", "params": <Event>}`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "DEFAULT_PORT",
    "EVENT_TYPES",
    "JOB_STATES",
    "TERMINAL_STATES",
    "AbortParams",
    "AuthParams",
    "ClearResult",
    "EnqueueResult",
    "ErrorCode",
    "Event",
    "GenerateSpec",
    "JobError",
    "JobRecord",
    "JobRef",
    "JobSpec",
    "JobState",
    "JobsParams",
    "JobsResult",
    "LoraInfo",
    "LoraRef",
    "LorasParams",
    "LorasResult",
    "MatAnyOneSpec",
    "ModelInfo",
    "ModelsResult",
    "MoveParams",
    "MoveResult",
    "OkResult",
    "PauseParams",
    "PresetInfo",
    "PresetsResult",
    "Progress",
    "QueueCounts",
    "QueueStateResult",
    "ResolvedGenerate",
    "ResolvedJob",
    "ResolvedLora",
    "ResolvedMatAnyOne",
    "RetryParams",
    "RunningInfo",
    "ShutdownParams",
    "StatusParams",
    "StatusResult",
    "SubscribeParams",
    "SubscribeResult",
    "ValidateResult",
    "decode_job_spec",
]

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7870
MAX_LINE_BYTES = 1024 * 1024


class ErrorCode(IntEnum):
    """JSON-RPC error codes: the spec's own, then the project's from -32001 down."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    UNAUTHORIZED = -32001
    UNKNOWN_JOB = -32002
    WRONG_STATE = -32003
    MODEL_UNAVAILABLE = -32004
    SHUTTING_DOWN = -32005
    REQUEST_TOO_LARGE = -32006
    INVALID_INPUT = -32007


# --- job states ---------------------------------------------------------------------

JobState = Literal["queued", "running", "paused", "succeeded", "failed", "aborted"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "paused", "succeeded", "failed", "aborted")
TERMINAL_STATES = frozenset({"succeeded", "failed", "aborted"})

# Event types. `job.*` events carry the job id in `job`; the others carry None.
EVENT_TYPES: tuple[str, ...] = (
    "job.queued",
    "job.started",
    "job.progress",
    "job.paused",
    "job.resumed",
    "job.succeeded",
    "job.failed",
    "job.aborted",
    "job.moved",
    "job.updated",
    "queue.paused",
    "queue.resumed",
    "queue.cleared",
    "model.loading",
    "model.loaded",
    "subscription.dropped",
    "daemon.stopping",
)

# --- job specs (what a client asks for) ----------------------------------------------

Priority = Annotated[int, Meta(ge=-1000, le=1000)]
Dimension = Annotated[int, Meta(ge=16, le=4096)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]


MemoryProfile = Literal["none", "model", "group", "sequential"]
StepCache = Literal["none", "fbc", "mag", "taylorseer", "pab"]
AttentionBackend = Literal["native", "flash", "sage"]
MetadataMode = Literal["embedded", "json", "none"]
MediaPath = Annotated[str, Meta(min_length=1, max_length=4096)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]


class LoraRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A LoRA asked for by a job: its name in the LoRA library (file stem or relative
    path) and a multiplier in Wan2GP's syntax: "0.8" constant, "1,0.5" a per-step
    schedule (the steps split evenly), "1;0" per phase of a two-expert Wan 2.2 model."""

    name: Annotated[str, Meta(min_length=1, max_length=1024)]
    multiplier: Annotated[str, Meta(min_length=1, max_length=1024)] = "1"


class GenerateSpec(
    Struct, tag="generate", tag_field="kind", forbid_unknown_fields=True, kw_only=True
):
    """A Wan generation. Fields left out take the model's (or the daemon's) defaults at
    enqueue time.

    `kind` may be omitted on the wire (it defaults to "generate"). Media inputs are paths
    the daemon can read; they are checked (exists, decodes, size) before queueing.
    """

    prompt: Annotated[str, Meta(min_length=1, max_length=20_000)]
    model: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None
    negative_prompt: Annotated[str, Meta(max_length=20_000)] | None = None
    width: Dimension | None = None
    height: Dimension | None = None
    frames: Annotated[int, Meta(ge=1, le=1025)] | None = None
    steps: Annotated[int, Meta(ge=1, le=500)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    seed: Seed | None = None
    fps: Annotated[int, Meta(ge=1, le=240)] | None = None
    flow_shift: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    output_name: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    priority: Priority = 0
    # conditioning media (image-to-video, video-to-video, VACE)
    image: MediaPath | None = None  # start frame
    last_image: MediaPath | None = None  # end frame (I2V models that take one)
    video: MediaPath | None = None  # source video (V2V) or control video (VACE)
    mask: MediaPath | None = None  # VACE mask (video or a single image)
    reference_images: Annotated[list[MediaPath], Meta(max_length=8)] | None = None
    strength: Fraction | None = None  # V2V: how much of the source video is renoised
    # Wan 2.2 two-expert models
    guidance_scale_2: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    boundary_ratio: Fraction | None = None
    # engine: memory and speed
    memory_profile: MemoryProfile | None = None
    fp8: bool | None = None  # store weights in float8, compute in the job's dtype
    step_cache: StepCache | None = None
    step_cache_threshold: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    attention: AttentionBackend | None = None
    compile: bool | None = None
    preview_every: Annotated[int, Meta(ge=0, le=500)] | None = None  # 0: no previews
    # adapters
    loras: Annotated[list[LoraRef], Meta(max_length=32)] | None = None
    preset: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None
    enhance_prompt: bool | None = None  # None: the daemon's enhancer setting
    # media
    audio: MediaPath | None = None  # audio (or a video with audio) to attach
    metadata: MetadataMode | None = None


class MatAnyOneSpec(
    Struct, tag="matanyone", tag_field="kind", forbid_unknown_fields=True, kw_only=True
):
    """A MatAnyone matting run: a video (or one image) and the first frame's mask."""

    input: MediaPath
    mask: MediaPath
    model: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None  # weights
    start_frame: Annotated[int, Meta(ge=0)] = 0
    end_frame: Annotated[int, Meta(ge=1)] | None = None  # exclusive; None: to the end
    erode: Annotated[int, Meta(ge=0, le=100)] = 0
    dilate: Annotated[int, Meta(ge=0, le=100)] = 0
    warmup: Annotated[int, Meta(ge=0, le=100)] = 10
    max_size: Annotated[int, Meta(ge=64, le=8192)] | None = None  # longest side processed
    mask_type: Literal["alpha", "foreground", "greenscreen"] = "alpha"
    rgba_zip: bool = False
    reattach_audio: bool = True
    output_name: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    metadata: MetadataMode | None = None
    priority: Priority = 0


# The tagged union of job kinds ("kind" selects; missing means "generate").
JobSpec = GenerateSpec | MatAnyOneSpec
_JOB_SPEC_DECODER = msgspec.json.Decoder(JobSpec)
_GENERATE_DECODER = msgspec.json.Decoder(GenerateSpec)


def decode_job_spec(data: bytes | str) -> JobSpec:
    """Decode a job spec; one without `kind` is a generation (the first protocol had
    only those, and scripts written for it keep working)."""
    try:
        return _JOB_SPEC_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        if str(exc) != "Object missing required field `kind`":
            raise
        return _GENERATE_DECODER.decode(data)


class ResolvedLora(Struct, frozen=True, kw_only=True):
    name: str
    path: str
    multiplier: str
    sha256: str = ""


class ResolvedGenerate(Struct, tag="generate", tag_field="kind", frozen=True, kw_only=True):
    """A generation with every default filled in: what the worker runs and the output
    records. Running the same ResolvedGenerate twice gives the same frames.

    Fields added after the first release all have defaults, so job records written by an
    older daemon still decode.
    """

    model: str  # the name the user gave or the registry default
    source: str  # what from_pretrained loads: a local folder or a hub id
    prompt: str  # what the model is given (the enhanced prompt when enhanced)
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    seed: int
    fps: int
    flow_shift: float
    output_name: str
    dtype: str = "float32"
    family: str = ""  # the registry family ("wan2.1-t2v", "wan2.1-i2v", ...)
    image: str | None = None  # absolute paths, checked at enqueue
    last_image: str | None = None
    video: str | None = None
    mask: str | None = None
    reference_images: list[str] = msgspec.field(default_factory=list)
    inputs_sha256: dict[str, str] = msgspec.field(default_factory=dict)
    strength: float | None = None
    guidance_scale_2: float | None = None
    boundary_ratio: float | None = None
    memory_profile: str = "none"
    fp8: bool = False
    step_cache: str = "none"
    step_cache_threshold: float | None = None
    attention: str = "native"
    compile: bool = False
    preview_every: int = 0
    loras: list[ResolvedLora] = msgspec.field(default_factory=list)
    preset: str | None = None
    original_prompt: str | None = None  # the user's prompt when `prompt` was enhanced
    enhancer: dict[str, Any] | None = None  # provider, model, outcome (and why it failed)
    audio: str | None = None
    metadata: str = "embedded"
    # A [models.NAME] model: component -> the single .safetensors file its weights came
    # from (the base is `source`); empty for a plain model.
    files: dict[str, str] = msgspec.field(default_factory=dict)


class ResolvedMatAnyOne(Struct, tag="matanyone", tag_field="kind", frozen=True, kw_only=True):
    """A matting run with its inputs checked and every default filled in."""

    input: str  # absolute path
    mask: str
    model: str  # weights name or path ("tiny" for the built-in random network)
    start_frame: int
    end_frame: int  # exclusive
    frames: int  # end_frame - start_frame
    width: int  # of the source
    height: int
    fps: float
    erode: int
    dilate: int
    warmup: int
    max_size: int | None
    mask_type: str
    rgba_zip: bool
    reattach_audio: bool
    output_name: str
    metadata: str = "embedded"
    inputs_sha256: dict[str, str] = msgspec.field(default_factory=dict)
    seed: int = 0  # only the tiny random network uses it

    @property
    def steps(self) -> int:
        """Progress is counted in frames."""
        return self.frames


ResolvedJob = ResolvedGenerate | ResolvedMatAnyOne


# --- job records ---------------------------------------------------------------------


class Progress(Struct, kw_only=True):
    step: int = 0
    steps: int = 0
    phase: str = "queued"  # queued | loading | denoising | decoding | saving | done
    eta: float | None = None  # seconds left, when known


class JobError(Struct, kw_only=True):
    type: str  # a short machine-readable kind, e.g. "ModelUnavailable", "OutOfMemory"
    message: str  # one human sentence; never a traceback


class JobRecord(Struct, kw_only=True):
    id: int
    state: JobState
    spec: ResolvedJob
    priority: int = 0
    attempts: int = 0
    progress: Progress | None = None
    outputs: list[str] = msgspec.field(default_factory=list)
    error: JobError | None = None
    retry_of: int | None = None
    # A queued job cut off mid-way: the step its resume point holds (it goes on from
    # there if run with the same settings); None without one.
    resume_step: int | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0


# --- events --------------------------------------------------------------------------


class Event(Struct, kw_only=True):
    seq: int
    ts: float
    type: str
    job: int | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


# --- method params and results ---------------------------------------------------------


class Params(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for params: unknown fields are errors, so typos never pass silently."""


class AuthParams(Params):
    token: Annotated[str, Meta(min_length=1, max_length=4096)]


class StatusParams(Params):
    job: int | None = None


class PauseParams(Params):
    mode: Literal["now", "after_current"] = "now"


class AbortParams(Params):
    job: int | None = None


class SubscribeParams(Params):
    since: Annotated[int, Meta(ge=0)] | None = None
    jobs: list[int] | None = None


class JobsParams(Params):
    state: list[JobState] | None = None
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100


class JobRef(Params):
    job: int


class RetryParams(Params):
    job: int
    # Ask the prompt enhancer again (from the original prompt) instead of reusing the
    # enhanced prompt the job ran with.
    enhance: bool = False


class MoveParams(Params):
    job: int
    position: Annotated[int, Meta(ge=0)]


class ShutdownParams(Params):
    # "graceful": hold the running job at its next step and requeue it; "finish": let it end.
    mode: Literal["graceful", "finish"] = "graceful"


class OkResult(Struct, kw_only=True):
    ok: bool = True


class EnqueueResult(Struct, kw_only=True):
    job: int
    state: JobState
    position: int  # 0 = next to run
    spec: ResolvedJob


class QueueStateResult(Struct, kw_only=True):
    paused: bool
    mode: str | None = None  # "now" | "after_current" while paused


class QueueCounts(Struct, kw_only=True):
    queued: int = 0
    running: int = 0
    paused: int = 0
    succeeded: int = 0
    failed: int = 0
    aborted: int = 0


class RunningInfo(Struct, kw_only=True):
    job: int
    state: JobState
    model: str
    step: int = 0
    steps: int = 0
    phase: str = "starting"
    eta: float | None = None


class StatusResult(Struct, kw_only=True):
    version: str
    pid: int
    uptime: float
    device: str
    paused: bool
    pause_mode: str | None
    model: str | None  # the warm model, if any
    queue: QueueCounts
    running: RunningInfo | None
    last_seq: int
    # When this process started (Unix time): with `pid`, names the daemon process, so a
    # client can tell a restart from a gap in its events.
    started_at: float = 0.0
    # Why the daemon paused the queue itself (an output folder it cannot write); None
    # for a pause a user asked for.
    pause_reason: str | None = None


class JobsResult(Struct, kw_only=True):
    jobs: list[JobRecord]


class ClearResult(Struct, kw_only=True):
    cancelled: list[int]


class MoveResult(Struct, kw_only=True):
    job: int
    position: int


class SubscribeResult(Struct, kw_only=True):
    last_seq: int  # the newest event the daemon has published
    replayed: int  # how many buffered events follow this reply
    complete: bool  # False when `since` is older than the ring buffer holds


class ModelInfo(Struct, kw_only=True):
    name: str
    source: str
    family: str
    description: str = ""
    available: bool = False  # on disk (or buildable offline)
    loaded: bool = False
    default: bool = False
    # job fields beyond the common ones this model takes / cannot run without
    # ("image", "last_image", "video", "mask", "reference_images", "strength", ...)
    accepts: list[str] = msgspec.field(default_factory=list)
    requires: list[str] = msgspec.field(default_factory=list)
    # A [models.NAME] model: component -> its single .safetensors file (source: the base)
    files: dict[str, str] = msgspec.field(default_factory=dict)


class ModelsResult(Struct, kw_only=True):
    models: list[ModelInfo]


class ValidateResult(Struct, kw_only=True):
    """`validate`: what `enqueue` would queue, without queueing it (a dry run)."""

    spec: ResolvedJob
    plan: dict[str, Any] = msgspec.field(default_factory=dict)  # e.g. frames, sizes, outputs


class LorasParams(Params):
    model: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    state: bool = False  # also report what is loaded in the warm pipeline


class LoraInfo(Struct, kw_only=True):
    name: str
    path: str
    size: int = 0
    format: str = ""  # diffusers | wan | kohya
    rank: int | None = None
    error: str | None = None  # why the file cannot be used, when it cannot


class LorasResult(Struct, kw_only=True):
    family: str
    folders: list[str]
    loras: list[LoraInfo]
    state: dict[str, Any] | None = None


class PresetInfo(Struct, kw_only=True):
    name: str
    path: str
    loras: list[LoraRef] = msgspec.field(default_factory=list)
    prompt: str | None = None
    error: str | None = None


class PresetsResult(Struct, kw_only=True):
    folders: list[str]
    presets: list[PresetInfo]
