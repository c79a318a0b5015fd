"""Claims on output files: what a cut-off run named and never noted is taken back by the
next attempt, and nothing else is ever touched."""

from __future__ import annotations

import os
from pathlib import Path

from wangend.media.atomic import RetryPolicy, publish
from wangend.media.claims import ClaimLog


def named_then_cut_off(folder: Path, claims: ClaimLog, job: int, data: bytes) -> Path:
    """Publish a file noting its claim, as the runtime does; the run then "dies"
    (nothing notes the output). The temp name is linked back, as a kill between the
    link and the temp's removal leaves it."""
    temps: list[Path] = []

    def note(temp: Path) -> None:
        claims.note(job, temp)
        temps.append(temp)

    final = publish(
        folder, "clip", ".mp4", lambda t: t.write_bytes(data), RetryPolicy(), on_claim=note
    )
    os.link(final, temps[0])
    return final


def test_undo_takes_back_the_named_copy_and_its_temp(tmp_path: Path) -> None:
    claims = ClaimLog(tmp_path / "state")
    out = tmp_path / "out"
    final = named_then_cut_off(out, claims, 7, b"video bytes")
    [temp] = out.glob(".clip.*.tmp.mp4")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["clip.mp4"]
    assert sorted(claims.undo(7)) == sorted([str(final), str(temp)])
    assert list(out.iterdir()) == [] and not claims.path(7).exists()
    assert claims.undo(7) == []  # nothing claimed any more


def test_undo_never_touches_a_file_that_is_not_the_claimed_one(tmp_path: Path) -> None:
    claims = ClaimLog(tmp_path / "state")
    out = tmp_path / "out"
    final = named_then_cut_off(out, claims, 3, b"first run")
    for temp in out.glob(".clip.*"):
        temp.unlink()
    kept_link = out / "my copy.mp4"  # the user's own name for the same file
    os.link(final, kept_link)
    final.unlink()
    final.write_bytes(b"a different file under the same name")
    other = out / "clip(2).mp4"
    other.write_bytes(b"first run")  # same size, another file
    assert claims.undo(3) == []
    assert sorted(p.name for p in out.iterdir()) == ["clip(2).mp4", "clip.mp4", "my copy.mp4"]


def test_a_damaged_claims_file_costs_nothing(tmp_path: Path) -> None:
    claims = ClaimLog(tmp_path)
    claims.path(5).write_text("{not json")
    assert claims.undo(5) == [] and not claims.path(5).exists()
    claims.path(6).write_text('[{"folder": 3}]')
    assert claims.undo(6) == [] and not claims.path(6).exists()
