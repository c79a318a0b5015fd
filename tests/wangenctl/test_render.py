"""How answers and errors read, with no daemon: a held job shows no countdown, `inspect`
lines up its columns, a -32602 error says what is wrong in words, and a followed job's
progress view says it is held."""

from __future__ import annotations

import io
import re
from typing import Any

import msgspec
import pytest
from rich.console import Console

from wangenctl.errors import RpcError, invalid_params_text
from wangenctl.progress_view import HumanEvents
from wangenctl.render import HumanRenderer
from wangend.protocol import Event, JobRecord, StatusResult

SPEC = {
    "kind": "generate",
    "model": "tiny",
    "source": "/models/tiny",
    "prompt": "a red fox",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "frames": 9,
    "steps": 300,
    "guidance_scale": 5.0,
    "seed": 42,
    "fps": 8,
    "flow_shift": 3.0,
    "output_name": "{job}",
}
PROGRESS = {"step": 45, "steps": 300, "phase": "denoising", "eta": 34.0}


def status(state: str) -> StatusResult:
    running = {"job": 7, "state": state, "model": "tiny", **PROGRESS}
    return msgspec.convert(
        {
            "version": "0.1.0",
            "pid": 1,
            "uptime": 5.0,
            "device": "cpu",
            "paused": state == "paused",
            "pause_mode": "now" if state == "paused" else None,
            "model": "tiny",
            "queue": {},
            "running": running,
            "last_seq": 3,
        },
        StatusResult,
    )


def record(state: str) -> JobRecord:
    return msgspec.convert(
        {"id": 7, "state": state, "spec": SPEC, "progress": PROGRESS, "created_at": 1.0},
        JobRecord,
    )


def stdout_of(capsys: pytest.CaptureFixture[str], show: Any, *args: Any) -> list[str]:
    show(*args)
    return capsys.readouterr().out.splitlines()


# --- a held job has no eta ------------------------------------------------------------------


def test_status_of_a_paused_job_has_no_eta(capsys: pytest.CaptureFixture[str]) -> None:
    out = HumanRenderer()
    [paused] = [line for line in stdout_of(capsys, out.status, status("paused")) if "job 7" in line]
    assert paused.endswith("job 7 (tiny) paused, denoising 45/300")
    [running] = [
        line for line in stdout_of(capsys, out.status, status("running")) if "job 7" in line
    ]
    assert running.endswith("job 7 (tiny) running, denoising 45/300, eta 34s")


def test_a_paused_jobs_record_has_no_eta(capsys: pytest.CaptureFixture[str]) -> None:
    out = HumanRenderer()
    [paused] = [line for line in stdout_of(capsys, out.job, record("paused")) if "progress" in line]
    assert paused.split() == ["progress", "denoising", "45/300"]
    [running] = [
        line for line in stdout_of(capsys, out.job, record("running")) if "progress" in line
    ]
    assert running.split() == ["progress", "denoising", "45/300,", "eta", "34s"]


def test_a_paused_jobs_bar_counts_nothing_down() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150, color_system=None)
    with HumanEvents(console, 7) as view:
        view.seed(record("paused"))
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "job 7" in shown and "45/300" in shown and "paused" in shown
    assert "eta -" in shown and "34s" not in shown


# --- inspect --------------------------------------------------------------------------------


def test_inspect_puts_every_value_in_one_column(capsys: pytest.CaptureFixture[str]) -> None:
    document = {
        "wangend": "0.1.0",
        "created_at": "2026-11-24T10:15:00",
        "job": 3,
        "device": "cpu",
        "settings": {"prompt": "a fox", "guidance_scale": 5.0, "steps": 2},
        "frames_sha256": "ab" * 32,
    }
    lines = stdout_of(capsys, HumanRenderer().settings, "clip.mp4", document)[2:]
    assert [line.split()[0] for line in lines] == [
        "prompt",
        "guidance_scale",
        "steps",
        "frames_sha256",
    ]
    columns = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}
    assert columns == {len("guidance_scale") + 2}, lines


# --- -32602 in words ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field", "said"),
    [
        ("Expected `str` of length >= 1", "$.params.prompt", "prompt: must not be empty"),
        ("Expected `int` >= 1", "$.params.frames", "frames: must be at least 1"),
        ("Expected `int` <= 500", "$.params.steps", "steps: must be at most 500"),
        ("Expected `float` > 0.0", "$.params.flow_shift", "flow_shift: must be more than 0.0"),
        (
            "Expected `str` of length <= 255",
            "$.params.output_name",
            "output_name: must have at most 255 characters",
        ),
        (
            "Expected `array` of length <= 8",
            "$.params.reference_images",
            "reference_images: must have at most 8 items",
        ),
        ("Expected `int`, got `str`", "$.params.seed", "seed: must be a whole number, not text"),
        (
            "Expected `int | null`, got `float`",
            "$.params.frames",
            "frames: must be a whole number or null, not a number",
        ),
        (
            "Invalid enum value 'fast'",
            "$.params.attention",
            "attention: 'fast' is not one of the choices",
        ),
        ("Object contains unknown field `stepz`", "$.params.stepz", "stepz: is not a known field"),
        ("Object missing required field `prompt`", "$.params.prompt", "prompt: is required"),
        ("Expected `object`, got `array`", "$.params", "params: must be an object, not a list"),
        # The daemon's own sentences stay as they are, with the field when they lack it.
        ("output_name must not be blank", "$.params.output_name", "output_name must not be blank"),
        ("LoRA ink is listed twice", "$.params.loras[1]", "loras[1]: LoRA ink is listed twice"),
    ],
)
def test_invalid_params_in_words(message: str, field: str, said: str) -> None:
    assert invalid_params_text(message, field) == said
    error = RpcError(-32602, message, {"field": field, "message": message})
    assert (str(error), error.message) == (said, message)


def test_other_errors_are_the_daemons_message() -> None:
    assert str(RpcError(-32002, "no job with id 4", {"job": 4})) == "no job with id 4"


def test_a_run_that_starts_late_says_from_which_step() -> None:
    """Without a terminal each phase is a line; a resumed run enters denoising at the step
    its resume point holds, and the line says so."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=False, width=150)

    def progress(seq: int, step: int) -> Event:
        data = {"step": step, "steps": 200, "phase": "denoising"}
        return Event(seq=seq, ts=0.0, type="job.progress", job=7, data=data)

    with HumanEvents(console, 7) as view:
        view.event(progress(1, 63))
    with HumanEvents(console, 8) as view:
        view.event(msgspec.structs.replace(progress(2, 0), job=8))
    assert screen.getvalue().splitlines() == [
        "job 7: denoising from step 63 of 200",
        "job 8: denoising (200 steps)",
    ]


def test_a_queued_job_with_a_resume_point_says_where_it_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = HumanRenderer()
    queued = msgspec.structs.replace(record("queued"), resume_step=63)
    [line] = [line for line in stdout_of(capsys, out.job, queued) if "resumes" in line]
    assert line.split() == ["resumes", "after", "step", "63/300", "(its", "resume", "point)"]
    [row] = [line for line in stdout_of(capsys, out.jobs, [queued]) if line.startswith("7")]
    assert "resumes after 63" in row
    assert not [line for line in stdout_of(capsys, out.job, record("queued")) if "resumes" in line]


def test_models_show_brackets_as_written_and_a_file_models_files(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from wangend.protocol import ModelInfo

    models = [
        ModelInfo(
            name="wan14b-comfy", source="wan2.1-t2v-14b", family="wan2.1-t2v",
            description="my [v2] merge", available=True,
            files={"transformer": "/ckpts/wan14b.safetensors"},
        ),
        ModelInfo(
            name="stacked", source="x", family="unknown",
            description="model stacked: base mine is itself a [models.*] model",
        ),
    ]  # fmt: skip
    text = " ".join(" ".join(stdout_of(capsys, HumanRenderer().models, models)).split())
    assert "my [v2] merge (transformer: /ckpts/wan14b.safetensors)" in text
    assert "is itself a [models.*] model" in text
    assert "stacked unknown unusable model stacked" in text  # on disk, but it cannot load


def test_inspect_says_the_runs_notes(capsys: pytest.CaptureFixture[str]) -> None:
    """What the --json document holds about how the run went shows in plain text too."""
    document = {
        "wangend": "0.1.0",
        "job": 3,
        "notes": ["resumed after step 12 of 30 from the resume point of an earlier attempt"],
        "audio": {"source": "/in/song.wav", "error": "no audio stream"},
        "settings": {"prompt": "a fox"},
    }
    lines = stdout_of(capsys, HumanRenderer().settings, "clip.mp4", document)
    assert "note: resumed after step 12 of 30 from the resume point of an earlier attempt" in (
        lines
    )
    assert "note: audio from /in/song.wav left out: no audio stream" in lines
