"""Output-name templates: every placeholder renders, for both job kinds; nothing a
template or a prompt holds can name a path outside the output folder."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from wangend.errors import InvalidParams
from wangend.media.naming import (
    DEFAULT_OUTPUT_NAME,
    MAX_STEM_BYTES,
    check_output_name,
    render_output_name,
)

from .support import make_job, make_matting

WHEN = datetime(2025, 1, 2, 3, 4, 5)


def render(template: str, job=None, job_id: int = 7) -> str:
    return render_output_name(template, job_id=job_id, job=job or make_job(), now=WHEN)


def test_default_template_keeps_todays_names() -> None:
    assert render(DEFAULT_OUTPUT_NAME) == "20250102-030405_tiny_42"


@pytest.mark.parametrize(
    ("template", "stem"),
    [
        ("{job}-{seed}-{model}", "7-42-tiny"),
        ("{steps}x{frames}@{resolution}", "4x9-64x48"),
        ("{date(%Y-%m-%d-%Hh%Mm%Ss)}", "2025-01-02-03h04m05s"),
        ("{date(%H:%M)}_{date}", "03-04_20250102-030405"),
        ("{prompt}", "a-fox-in-the-snow-enhanced-with-detail"),
        ("{prompt(5)}_{seed}", "a-fox_42"),
        ("clip {job}", "clip-7"),
    ],
)
def test_placeholders(template: str, stem: str) -> None:
    check_output_name(template)
    assert render(template) == stem


def test_matting_jobs_use_the_input_name() -> None:
    job = make_matting()
    assert render("{prompt}_{steps}_{frames}_{resolution}_{seed}", job) == (
        "dancer-take-2_9_9_64x48_0"
    )
    assert render(DEFAULT_OUTPUT_NAME, job) == "20250102-030405_tiny_0"


def test_mask_type_names_the_matting_output() -> None:
    """The matting default, `{date}_{input}_{mask_type}`, says what the video holds; a
    generation has no mask type ("none", like `{input}` without an input)."""
    from wangend.matting.inputs import DEFAULT_OUTPUT_NAME as MATTING_DEFAULT

    check_output_name(MATTING_DEFAULT)
    job = make_matting(mask_type="greenscreen")
    assert render(MATTING_DEFAULT, job) == "20250102-030405_dancer-take-2_greenscreen"
    assert render("{input}_{mask_type}") == "none_none"


@pytest.mark.parametrize(
    "template",
    [
        "../up", "a/b", "/abs", "a\\b", "x\x01y", "x\ny", ".hidden", "~home", "  ",
        "{nope}", "{seed.__class__}", "{seed!r}", "{seed:>10}", "{", "}", "{0}", "{}",
        "{seed(3)}", "{prompt(0)}", "{prompt(x)}", "{prompt(999)}", "{date(no format)}",
        "{date(%Q)}", "{date()}", "a{{b}}",
    ],
)  # fmt: skip
def test_bad_templates_name_the_field(template: str) -> None:
    with pytest.raises(InvalidParams) as info:
        check_output_name(template)
    assert info.value.field == "$.params.output_name"
    assert info.value.data == {"field": "$.params.output_name", "message": info.value.message}


@pytest.mark.parametrize(
    "prompt",
    ["../../etc/passwd", "/abs/path", "..", "...hidden", "a\x00b\x1fc", "C:\\win\\x", "~/x"],
)
def test_hostile_prompts_stay_one_name(tmp_path: Path, prompt: str) -> None:
    stem = render("{prompt}", make_job(prompt=prompt))
    assert stem and "/" not in stem and "\\" not in stem and ".." not in stem
    assert not stem.startswith((".", "-", "~")) and all(ord(c) >= 32 for c in stem)
    assert (tmp_path / stem).resolve().parent == tmp_path.resolve()


def test_date_format_cannot_make_a_path() -> None:
    check_output_name("{date(%Y/%m/%d)}")  # a strftime format, '/' is its own business
    assert render("{date(%Y/%m/%d)}") == "2025-01-02"


def test_length_is_capped_in_bytes() -> None:
    job = make_job(prompt="長" * 500)
    for template in ("x" * 250, "{prompt(200)}" * 4, "{prompt(200)}_{seed}"):
        stem = render(template, job)
        assert 0 < len(stem.encode()) <= MAX_STEM_BYTES
        stem.encode().decode("utf-8")  # never cut inside a character


def test_empty_values_fall_back() -> None:
    assert render("{prompt}", make_job(prompt="!!!")) == "prompt"
    assert render("{model}", make_job(model="org/Some Model")) == "Some-Model"


def test_a_hub_cache_snapshot_is_named_for_its_repository() -> None:
    snapshot = "/home/me/.cache/huggingface/hub/models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers"
    commit = "/snapshots/0f3a9c1e5b7d2a4c6e8f0a1b3c5d7e9f1a2b3c4d/"
    assert render("{model}", make_job(model=snapshot + commit)) == "Wan2.1-T2V-1.3B-Diffusers"
    assert render("{model}", make_job(model=snapshot)) == "Wan2.1-T2V-1.3B-Diffusers"
    assert render("{model}", make_job(model="/models/snapshots/v2")) == "v2"
