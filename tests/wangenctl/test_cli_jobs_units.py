"""The job-making commands' parts that need no daemon: the --lora rule, options refused
before anything is sent, how previews are shown and saved, and `wangend history`'s
--since and --output."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from wangenctl.cli import app
from wangenctl.jobs_cli import _PreviewSaver, model_argument, parse_lora, preview_file_name
from wangenctl.render import HumanRenderer, JsonRenderer, _without_preview_data
from wangend.cli import app as wangend_app
from wangend.cli import parse_since
from wangend.protocol import Event


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def jpeg(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def progress_event(job: int, step: int, data: bytes) -> Event:
    preview = {
        "step": step,
        "steps": 2,
        "mime": "image/jpeg",
        "width": 8,
        "height": 6,
        "frame": 0,
        "data": base64.b64encode(data).decode(),
    }
    return Event(
        seq=step,
        ts=time.time(),
        type="job.progress",
        job=job,
        data={"step": step, "steps": 2, "phase": "denoising", "eta": 1.0, "preview": preview},
    )


# --- --lora NAME[:MULT] ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ink", {"name": "ink"}),
        ("ink:0.8", {"name": "ink", "multiplier": "0.8"}),
        ("fast:1,0.5", {"name": "fast", "multiplier": "1,0.5"}),
        ("expert:1;0", {"name": "expert", "multiplier": "1;0"}),
        ("styles/ink:-0.25", {"name": "styles/ink", "multiplier": "-0.25"}),
        ("a:b:0.5", {"name": "a:b", "multiplier": "0.5"}),
        ("tiny:1e-1", {"name": "tiny", "multiplier": "1e-1"}),
    ],
)
def test_lora_takes_the_multiplier_after_the_last_colon(text: str, expected: dict) -> None:
    assert parse_lora(text) == expected


@pytest.mark.parametrize("text", ["ink:", ":0.5", "ink:strong", "a:b", "ink: "])
def test_lora_text_that_is_no_name_and_multiplier_is_refused(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="NAME:MULTIPLIER"):
        parse_lora(text)


# --- --model: a local folder goes absolute, names and hub ids as typed -------------------------


def test_a_model_folder_given_relative_reaches_the_daemon_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "my wan").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    monkeypatch.setenv("HOME", str(tmp_path))
    wan = str(tmp_path / "models" / "my wan")
    assert model_argument("./my wan") == wan
    assert model_argument("../models/my wan/") == wan
    assert model_argument("~/models/my wan") == wan
    monkeypatch.chdir(tmp_path)
    assert model_argument("models/my wan") == wan  # exists here: a folder, not a hub id
    assert model_argument("./absent") == str(tmp_path / "absent")  # the daemon says it is not there
    for typed in ("tiny", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "~nobody-by-this-name/wan", None):
        assert model_argument(typed) == typed


def test_a_bare_name_that_is_a_model_folder_here_gets_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare name means the daemon's models folder; the folder of that name here needs ./"""
    (tmp_path / "mywan").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_argument("mywan") == "mywan"
    assert capsys.readouterr().err == ""  # not a model folder: no note
    (tmp_path / "mywan" / "model_index.json").write_text("{}")
    assert model_argument("mywan") == "mywan"
    assert "for the folder here, write --model ./mywan" in capsys.readouterr().err


# --- refused before the daemon is asked (exit 2, no daemon needed) -----------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["submit", "p", "--profile", "huge"], "sequential"),
        (["submit", "p", "--cache", "lru"], "taylorseer"),
        (["submit", "p", "--attention", "xformers"], "sage"),
        (["submit", "p", "--metadata", "xml"], "embedded"),
        (["submit", "p", "--lora", "ink:strong"], "NAME:MULTIPLIER"),
        (["submit", "p", "--save-previews", "prev"], "--follow"),
        (["submit", "--steps", "4"], "prompt"),
        (["matanyone", "--input", "nope.mp4", "--mask", "m.png"], "nope.mp4"),
        (["matanyone", "--type", "cutout"], "greenscreen"),
    ],
)
def test_bad_options_exit_2_naming_the_problem(
    args: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANGEN_URL", f"unix://{tmp_path}/no.sock")
    result = invoke(*args)
    assert result.exit_code == 2
    assert named in " ".join(result.output.replace("│", " ").split())


def test_inspect_needs_no_daemon_and_says_when_a_file_has_no_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANGEN_URL", f"unix://{tmp_path}/no.sock")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    result = invoke("inspect", str(plain))
    assert result.exit_code == 1
    assert str(plain) in result.output and "Traceback" not in result.output


# --- previews ------------------------------------------------------------------------------


def test_json_events_carry_the_preview_size_not_its_base64(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = jpeg()
    event = progress_event(4, 1, data)
    shown = _without_preview_data(event)
    assert "data" not in shown.data["preview"] and shown.data["preview"]["bytes"] == len(data)
    assert event.data["preview"]["data"]  # the event itself is left whole

    with JsonRenderer().events(4) as view:
        view.event(event)
    [line] = capsys.readouterr().out.splitlines()
    printed = json.loads(line)
    assert printed["data"]["preview"] == {
        "step": 1,
        "steps": 2,
        "mime": "image/jpeg",
        "width": 8,
        "height": 6,
        "frame": 0,
        "bytes": len(data),
    }
    assert printed["data"]["step"] == 1 and printed["job"] == 4


def test_people_see_a_preview_marker_and_no_base64(capsys: pytest.CaptureFixture[str]) -> None:
    event = progress_event(7, 2, jpeg())
    with HumanRenderer().events(7) as view:
        view.event(event)
    err = capsys.readouterr().err
    assert "job 7: preview 2/2 (8x6 jpeg)" in err
    assert event.data["preview"]["data"][:20] not in err


def test_previews_are_saved_as_job_dash_step_jpegs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "deep" / "previews"
    saver = _PreviewSaver(folder, HumanRenderer())
    for step in (1, 2):
        saver(progress_event(12, step, jpeg(8 * step, 6)))
    saver(Event(seq=9, ts=0.0, type="job.progress", job=12, data={"step": 2, "steps": 2}))
    assert sorted(p.name for p in folder.iterdir()) == ["12-1.jpg", "12-2.jpg"]
    assert preview_file_name(12, 2) == "12-2.jpg"
    with Image.open(folder / "12-2.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (16, 6))

    broken = progress_event(13, 1, b"")
    broken.data["preview"]["data"] = "not base64!"
    saver(broken)
    assert not (folder / "13-1.jpg").exists()
    assert "preview of job 13 step 1 not saved" in capsys.readouterr().err


# --- wangend history ---------------------------------------------------------------------------


def test_since_reads_unix_seconds_and_iso_8601() -> None:
    assert parse_since("1764000000") == 1764000000.0
    assert parse_since("1764000000.5") == 1764000000.5
    assert parse_since("2026-11-24") == datetime(2026, 11, 24).timestamp()
    assert parse_since("2026-11-24T15:00:00+00:00") == 1795532400.0
    with pytest.raises(typer.BadParameter, match="ISO 8601"):
        parse_since("yesterday")


def make_queue_db(path: Path, finished: list[tuple[int, str, float]]) -> None:
    """A queue database shaped like the daemon's, holding finished jobs only."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, spec TEXT, attempts INT, "
            "outputs TEXT, error TEXT, retry_of INT, created_at REAL, started_at REAL, "
            "finished_at REAL)"
        )
        for job, state, at in finished:
            spec = json.dumps({"kind": "generate", "prompt": f"job {job}"})
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, 1, '[]', NULL, NULL, ?, ?, ?)",
                (job, state, spec, at - 2, at - 1, at),
            )


def test_history_since_and_output_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    make_queue_db(state / "queue.sqlite3", [(1, "succeeded", 1000.0), (2, "failed", 2000.0)])
    target = tmp_path / "runs.jsonl"
    runner = CliRunner()
    args = ["history", "--state-dir", str(state), "--since", "1500", "--output", str(target)]
    result = runner.invoke(wangend_app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(line["id"], line["state"]) for line in lines] == [(2, "failed")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl", "state"]

    everything = runner.invoke(wangend_app, ["history", "--state-dir", str(state)])
    assert [json.loads(x)["id"] for x in everything.stdout.splitlines()] == [1, 2]


def test_history_without_a_database_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(wangend_app, ["history", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no queue database" in result.output
