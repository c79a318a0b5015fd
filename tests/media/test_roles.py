"""Output roles come from the job and the writers' order, not from words in a name:
`wangend history` says `video` for a generation called `fox_alpha` and `matte` for a
matting job's alpha video whatever it is called."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from wangend.cli import app
from wangend.media.roles import ROLES, output_roles
from wangend.queue.store import JobStore

from .support import make_job, make_matting


@pytest.mark.parametrize(
    ("spec", "paths", "roles"),
    [
        ({"kind": "generate"}, ["/o/fox_alpha.mp4"], ["video"]),
        (
            {"kind": "generate"},
            ["/o/a_mask(2).mkv", "/o/a_mask(2).json", "/o/a_mask(2).source-1.png",
             "/o/a_mask(2).source-2(2).png"],
            ["video", "metadata", "source_image", "source_image"],
        ),
        ({"kind": "matanyone", "mask_type": "foreground"}, ["/o/m/clip_matte.mp4"], ["video"]),
        (
            {"kind": "matanyone", "mask_type": "alpha"},
            ["/o/m/dup(2).mp4", "/o/m/dup(2).json", "/o/m/dup(2).source-1.png",
             "/o/m/dup(2)_rgba.zip", "/o/m/dup(2)_mask.png", "/o/m/dup(2)_mask.json"],
            ["matte", "metadata", "source_image", "frames_zip", "mask", "metadata"],
        ),
        ({"kind": "matanyone", "mask_type": "alpha"}, ["/o/m/x.webp", "/o/m/notes.txt"],
         ["matte", "other"]),
        (None, ["/o/still.png"], ["image"]),
    ],
)  # fmt: skip
def test_output_roles(spec: dict | None, paths: list[str], roles: list[str]) -> None:
    assert output_roles(spec, paths) == roles
    assert set(roles) <= ROLES


def test_wangend_history_prints_the_roles(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = JobStore(state / "queue.sqlite3")
    try:
        finished = [
            (make_job(output_name="fox_alpha"), ["/o/fox_alpha.mp4"]),
            (make_matting(mask_type="foreground"), ["/o/m/c_matte.mp4"]),
            (make_matting(rgba_zip=True), ["/o/m/dup.mp4", "/o/m/dup.json", "/o/m/dup_rgba.zip"]),
        ]
        for job, outputs in finished:
            job_id = store.insert(job).id
            store.transition(job_id, "running", allowed_from=["queued"])
            store.transition(job_id, "succeeded", allowed_from=["running"], outputs=outputs)
    finally:
        store.close()
    result = CliRunner().invoke(app, ["history", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [[o["role"] for o in line["outputs"]] for line in lines] == [
        ["video"],
        ["video"],
        ["matte", "metadata", "frames_zip"],
    ]
    assert msgspec.convert(lines[0]["spec"], type(finished[0][0])) == finished[0][0]
    out = tmp_path / "history.jsonl"
    assert (
        CliRunner().invoke(app, ["history", "--state-dir", str(state), "-o", str(out)]).exit_code
        == 0
    )
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
