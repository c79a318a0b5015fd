"""How people see a stream of events: one progress bar per running job on a terminal,
one plain line per change elsewhere (logs, pipes, CI).

Split from render.py, which owns every other answer's look; `HumanRenderer.events()`
builds one of these. A preview in `job.progress` is only a marker here ("preview 4/20"):
the image itself is saved by `--save-previews`, never printed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from wangend.protocol import Event, JobRecord

from .render import TERMINAL_EVENTS, _clip, _error_text, _format_bytes, format_seconds

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["HumanEvents"]

# Phases the plain (non-terminal) view leaves out: their own event already made a line.
_ANNOUNCED = frozenset({"starting", "loading model", "paused"})


class HumanEvents:
    """One progress bar per running job on a terminal; a plain line per change elsewhere.

    `job` set: the view follows one job, and its end is left to `Renderer.finished` (paths
    on stdout). `job` None: a daemon-wide watch, so every end is a line here. `announced`:
    the renderer has already said that `job` was queued (from the enqueue reply), so its
    first `job.queued` event makes no second line.
    """

    def __init__(self, console: Console, job: int | None, *, announced: bool = False) -> None:
        self.console = console
        self.job = job
        self._quiet_queued = announced
        self._progress: Progress | None = None
        self._tasks: dict[int, TaskID] = {}
        self._phase: dict[int, str] = {}
        self._started: dict[int, float] = {}
        self._current: int | None = None  # the job on the worker: model loads are its wait
        self._preview: dict[int, str] = {}  # the last preview's marker per job

    def __enter__(self) -> HumanEvents:
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[steps]}"),
                TextColumn("{task.fields[phase]}"),
                TextColumn("eta {task.fields[eta]}"),
                TextColumn("{task.fields[preview]}"),
                console=self.console,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def notice(self, text: str) -> None:
        self.console.print(text, markup=False, style="dim")

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False)

    def _update(
        self,
        job: int,
        phase: str,
        step: int = 0,
        steps: int = 0,
        eta: float | None = None,
        preview: dict[str, Any] | None = None,
    ) -> None:
        """Move the job's bar (or, without a terminal, say each new phase). A preview is
        a marker only: "preview 4/20" on the bar until the next one, a line elsewhere."""
        changed = self._phase.get(job) != phase
        self._phase[job] = phase
        counted = f"{step}/{steps}" if steps else ""
        if preview is not None:
            self._preview[job] = f"preview {preview.get('step', step)}/{steps or '?'}"
        if self._progress is None:
            if changed and phase not in _ANNOUNCED:
                steps_text = ""
                if phase == "denoising" and steps:  # a resumed or V2V run starts later
                    steps_text = f" from step {step} of {steps}" if step else f" ({steps} steps)"
                self._say(f"job {job}: {phase}{steps_text}")
            if preview is not None:
                size = f"{preview.get('width', '?')}x{preview.get('height', '?')}"
                self._say(f"job {job}: {self._preview[job]} ({size} jpeg)")
            return
        fields = {
            "phase": phase,
            "steps": counted,
            "eta": format_seconds(eta),
            "preview": self._preview.get(job, ""),
        }
        if job not in self._tasks:
            self._tasks[job] = self._progress.add_task(f"job {job}", total=None, **fields)
        self._progress.update(
            self._tasks[job], total=steps or None, completed=step, refresh=True, **fields
        )

    def _end(self, job: int) -> None:
        self._phase.pop(job, None)
        self._preview.pop(job, None)
        if self._current == job:
            self._current = None
        task = self._tasks.pop(job, None)
        if task is not None and self._progress is not None:
            self._progress.remove_task(task)

    def _loading(self, d: dict[str, Any]) -> None:
        """A model load: the first event is a line; the next ones (one per component
        read) move the job's bar by bytes, or make a line each where there is no bar."""
        if d.get("phase") == "downloading":
            done, parts = int(d.get("files_done") or 0), int(d.get("files_total") or 0)
            got, total = int(d.get("bytes_done") or 0), int(d.get("bytes_total") or 0)
            phase = "downloading model"
            first, last = done == 0 and got == 0, parts > 0 and done == parts
            counted = f"{done}/{parts} files, {_format_bytes(got)}/{_format_bytes(total)}"
        else:
            done = int(d.get("components_loaded") or 0)
            parts = int(d.get("components_total") or 0)
            got, total = int(d.get("bytes_loaded") or 0), int(d.get("bytes_total") or 0)
            phase = "loading model"
            first, last = done == 0, done > 0
            counted = f"{done}/{parts} parts, {_format_bytes(got)}/{_format_bytes(total)}"
        if first:
            self._say(f"{phase} {d.get('model')} on {d.get('device')}")
        if self._progress is None or self._current is None:
            if last:  # without a bar: a line per component read, or when a download ends
                detail = f" ({d.get('component')})" if d.get("component") else ""
                self._say(f"{phase} {d.get('model')}: {counted}{detail}")
            return
        job = self._current
        self._phase[job] = phase
        fields = {
            "phase": phase,
            "steps": counted if parts else "",
            "eta": "-",
            "preview": "",
        }
        if job not in self._tasks:
            self._tasks[job] = self._progress.add_task(f"job {job}", total=None, **fields)
        self._progress.update(
            self._tasks[job], total=total or None, completed=got, refresh=True, **fields
        )

    def seed(self, record: JobRecord) -> None:
        """Start from a job's recorded state (watching a job that is already under way)."""
        p = record.progress
        if record.state in ("running", "paused"):
            self._current = record.id
            self._started[record.id] = record.started_at or time.time()
            paused = record.state == "paused"
            phase = "paused" if paused else (p.phase if p else "starting")
            eta = p.eta if p and not paused else None  # a held job counts nothing down
            self._update(record.id, phase, p.step if p else 0, p.steps if p else 0, eta)
        elif record.state == "queued":
            self._say(f"job {record.id} is queued")

    def event(self, event: Event) -> None:
        kind, job, d = event.type, event.job, event.data
        if kind == "job.progress" and job is not None:
            self._update(
                job,
                str(d.get("phase", "")),
                int(d.get("step") or 0),
                int(d.get("steps") or 0),
                d.get("eta"),
                d.get("preview") if isinstance(d.get("preview"), dict) else None,
            )
        elif kind == "job.queued":
            if job == self.job and self._quiet_queued:
                self._quiet_queued = False
                return
            self._say(f"job {job} queued at position {d.get('position', '?')}")
        elif kind == "job.started" and job is not None:
            self._current = job
            self._started[job] = event.ts
            self._say(f"job {job} started ({d.get('model')}, attempt {d.get('attempt')})")
            self._update(job, "starting")
        elif kind == "model.loading":
            self._loading(d)
        elif kind == "model.loaded":
            self._say(f"model {d.get('model')} loaded in {format_seconds(d.get('seconds'))}")
        elif kind in ("job.paused", "job.resumed") and job is not None:
            verb = kind.removeprefix("job.")
            self._say(f"job {job} {verb} at step {d.get('step')}/{d.get('steps')}")
            if kind == "job.paused":
                self._update(job, "paused", int(d.get("step") or 0), int(d.get("steps") or 0))
        elif kind in TERMINAL_EVENTS and job is not None:
            took = event.ts - self._started[job] if job in self._started else None
            self._end(job)
            if self.job is None:
                state = kind.removeprefix("job.")
                detail = (
                    ", ".join(d.get("outputs") or []) if state == "succeeded" else _error_text(d)
                )
                after = f" after {format_seconds(took)}" if took is not None else ""
                self._say(f"job {job} {state}{after}" + (f": {detail}" if detail else ""))
        elif kind == "job.moved":
            self._say(f"job {job} moved to position {d.get('position')}")
        elif kind == "job.updated":
            enhancer = (d.get("spec") or {}).get("enhancer") or {}
            if enhancer.get("ok"):
                prompt = _clip(str(d["spec"].get("prompt", "")), 70)
                self._say(f"job {job}: prompt enhanced ({enhancer.get('provider')}): {prompt}")
            elif enhancer:
                self._say(f"job {job}: prompt not enhanced: {enhancer.get('reason', '?')}")
            else:
                self._say(f"job {job} updated")
        elif kind == "queue.paused":
            self._say(
                "queue paused"
                + (" after the current job" if d.get("mode") == "after_current" else "")
            )
        elif kind == "queue.resumed":
            self._say("queue resumed")
        elif kind == "queue.cleared":
            self._say(f"queue cleared ({len(d.get('cancelled') or [])} cancelled)")
        elif kind == "daemon.stopping":
            self._say(f"the daemon is stopping ({d.get('mode', 'graceful')})")
        else:
            self._say(f"{kind}" + (f" job {job}" if job is not None else ""))
