"""Which output files a job's run began to name, so the next attempt of a run cut off
between naming its outputs and noting them can take those files back.

`atomic.publish` gives a whole, fsynced temp file its final name with a hard link; the
runtime notes a job's outputs once all of them are named. A kill in between (a few
milliseconds) used to leave a complete output no record knew of, so the next attempt
wrote a second copy (`name(2).mp4`), and a kill between the link and the temp file's
removal left a hidden `.name.<hex>.tmp.mp4` too.

So before anything is written to a temp file its name is noted, and just before its
link its identity (fsynced both times): device, inode, size and modification time, which
the hard link shares. Undoing a run (the job's next attempt, or the job ending without
those outputs recorded: cancelled, failed, out of attempts) removes the noted temp name
(a random name only that run used) and every file with a noted identity under that
output's names (the final name, `name(N)`, the temp name). All four must match and the
name must be the output's, so another file (even one that reuses a freed inode number)
is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .atomic import fsync_dir, replace_durably

__all__ = ["ClaimLog"]

log = logging.getLogger("wangend.media")


class ClaimLog:
    """Claims of the jobs of one daemon, one `<job>.claims.json` per job in `folder`.
    Never raises on I/O trouble: bookkeeping must not cost a job its output."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, job_id: int) -> Path:
        return self.folder / f"{job_id}.claims.json"

    def note(self, job_id: int, temp: Path) -> None:
        """Note `temp` as the job's: by name before it exists, by identity once it is
        whole (about to be linked to its final name)."""
        temp = Path(temp).absolute()
        try:
            name = temp.name  # ".<stem>.<hex>.tmp<suffix>", as atomic.publish names it
            match = re.fullmatch(r"\.(.+)\.[0-9a-f]+\.tmp(\.[^.]*)", name)
            if match is None:
                raise ValueError(f"{name} is not a temp output name")
            claim: dict = {
                "folder": str(temp.parent),
                "stem": match.group(1),
                "suffix": match.group(2),
                "temp": name,
            }
            if temp.exists():
                st = temp.stat()
                claim.update(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)
            self._write(job_id, [*self._read(job_id), claim])
        except (OSError, ValueError) as exc:
            log.warning("job %d: output claim not noted: %s", job_id, exc)

    def undo(self, job_id: int) -> list[str]:
        """Remove the files an earlier attempt of the job named but never noted as its
        outputs, and forget the claims; returns the paths removed."""
        removed: list[str] = []
        for claim in self._read(job_id):
            try:
                removed += _remove_claimed(claim)
            except (OSError, KeyError, TypeError, ValueError) as exc:
                log.warning("job %d: claimed output not checked: %s", job_id, exc)
        if removed:
            log.info(
                "job %d: removed %s, begun by an attempt that was cut off before it "
                "noted its outputs", job_id, ", ".join(removed),
            )  # fmt: skip
        self.drop(job_id)
        return removed

    def drop(self, job_id: int) -> None:
        """Forget the job's claims (its outputs are noted, or it ended)."""
        try:
            self.path(job_id).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("job %d: claims not removed: %s", job_id, exc.strerror or exc)

    def _read(self, job_id: int) -> list[dict]:
        try:
            claims = json.loads(self.path(job_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [c for c in claims if isinstance(c, dict)] if isinstance(claims, list) else []

    def _write(self, job_id: int, claims: list[dict]) -> None:
        replace_durably(self.path(job_id), json.dumps(claims).encode())


def _remove_claimed(claim: dict) -> list[str]:
    """Unlink the claim's temp name, and every name of the claimed file among the
    output's own names."""
    folder, stem, suffix = Path(claim["folder"]), str(claim["stem"]), str(claim["suffix"])
    if "ino" not in claim:  # noted before it was written: only its own random name
        temp = folder / str(claim["temp"])
        if not re.fullmatch(rf"\.{re.escape(stem)}\.[0-9a-f]+\.tmp{re.escape(suffix)}", temp.name):
            return []
        try:
            temp.unlink()
        except FileNotFoundError:
            return []
        return [str(temp)]
    names = re.compile(
        rf"(?:{re.escape(stem)}(?:\(\d+\))?|\.{re.escape(stem)}\.[0-9a-f]+\.tmp){re.escape(suffix)}"
    )
    identity = (claim["dev"], claim["ino"], claim["size"], claim["mtime_ns"])
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.inode() != claim["ino"] or not names.fullmatch(entry.name):
                continue
            st = entry.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == identity:
                os.unlink(entry.path)
                removed.append(entry.path)
    if removed:
        fsync_dir(folder)
    return removed
