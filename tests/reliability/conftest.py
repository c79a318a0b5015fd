"""Helpers shared by the reliability suite: real daemons, real sockets, bounded loops."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import av

from ..support.outputs import files_under

TERMINAL_STATES = ("succeeded", "failed", "aborted")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def output_job_id(path: Path) -> int | None:
    """The job id embedded in an output's JSON comment."""
    with av.open(str(path)) as container:
        comment = container.metadata.get("comment")
    return json.loads(comment).get("job") if comment else None


def dot_files(folder: Path) -> list[Path]:
    """Temporary or partial files (names starting with '.') left anywhere under `folder`."""
    return [p for p in files_under(folder) if p.name.startswith(".")] if folder.exists() else []


def integrity(db_path: Path) -> str:
    with sqlite3.connect(db_path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
