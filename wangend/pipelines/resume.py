"""Resume points: a running job's denoising state on disk, so that a job cut off by a
crash, a kill -9, a power cut or a stop goes on from its last resume point instead of
from step 0.

A resume point is what the diffusers denoising loop carries from one step to the next
and nothing else: the latents and the scheduler's state (the step index and, for
multistep solvers such as the UniPC that Wan ships, the previous model outputs). Every
other input of a step (prompt embeddings, conditioning latents, the timesteps) is
rebuilt from the job spec exactly as the first attempt built it. Resuming therefore
gives the frames an uninterrupted run gives: tests/pipelines/test_resume.py checks it
bit for bit for every tiny family.

When a point is written (runtime.py decides, this module writes):
* every `[engine] resume_every` seconds of denoising (60 s by default: a step of a
  real model takes seconds to minutes, a point costs one device-to-host copy of a few
  tens of MB and a write);
* when the job is held by a pause (a held job often outlives the machine's uptime);
* when a stop asks the running job to go back to the queue (JobControl.request_suspend):
  the job ends its current step, writes a point and unwinds.

Step caches keep their own per-step state inside diffusers hooks, which a point does not
carry: a resumed fbc, taylorseer or pab run starts its cache afresh at the resumed step
(the first steps after it are computed in full, as at a run's start), so its frames are
close to an uninterrupted cached run's, not identical. MagCache counts steps itself and
would pair its magnitude ratios with the wrong steps after a skip: "mag" runs write no
points and start again from step 0.

One file per job, `<state dir>/resume/<job id>.safetensors`: tensors in safetensors (never
pickle), the rest as JSON in its metadata, written to a temp file, fsynced and renamed,
so a crash while writing leaves the previous point whole. A point records a fingerprint
of the resolved job, the engine options, the device and the scheduler class: it is used
only by the same job run the same way, and is discarded otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

from ..media.atomic import fsync_dir, replace_durably
from ..media.claims import ClaimLog

__all__ = [
    "FORMAT",
    "ResumePoint",
    "ResumeStore",
    "RunResume",
    "fingerprint",
    "restore_scheduler",
    "scheduler_state",
]

log = logging.getLogger(__name__)

FORMAT = "wangend-resume/1"
_FILE = re.compile(r"(\d+)\.(?:safetensors|outputs\.json|claims\.json)")
_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ResumePoint:
    """`done` pipeline steps are finished; `latents` and `scheduler` are their result."""

    done: int
    latents: torch.Tensor
    scheduler: dict[str, Any]


def fingerprint(job: Any, options: Any, device: str, scheduler: Any, weights: str = "") -> str:
    """What must be equal for a point to be resumed: the resolved job (prompt, seed,
    sizes, steps, LoRAs, dtype...), the engine options, the device, the scheduler, and
    the diffusers and torch versions (an upgrade may change a solver's state or a
    kernel, and the promise is the uninterrupted run's frames). `weights`: the model's
    load source with the identity of its files (a folder or file replaced since must not
    resume a point made from the old weights)."""
    import diffusers

    digest = hashlib.sha256(FORMAT.encode())
    for part in (msgspec.json.encode(job), msgspec.json.encode(options)):
        digest.update(part)
    if weights:
        digest.update(f"|{weights}".encode())
    kind = f"{type(scheduler).__module__}.{type(scheduler).__qualname__}"
    digest.update(f"|{device}|{kind}|{diffusers.__version__}|{torch.__version__}".encode())
    return digest.hexdigest()


def _tensor_spec(value: torch.Tensor) -> dict[str, Any]:
    return {"tensor": str(value.device)}


def scheduler_state(scheduler: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The scheduler's instance state as (description, tensors), or None when it holds
    something this format cannot store (then the run writes no points)."""
    description: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in vars(scheduler).items():
        # the config is rebuilt from the model folder; an instance attribute that
        # shadows the class (the restoring set_timesteps of a resumed run) is no state
        if name == "_internal_dict" or hasattr(type(scheduler), name):
            continue
        if isinstance(value, torch.Tensor):
            tensors[f"scheduler.{name}"] = value
            description[name] = _tensor_spec(value)
        elif isinstance(value, _SCALARS):
            description[name] = {"value": value}
        elif isinstance(value, list | tuple):
            items: list[dict[str, Any]] = []
            for index, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    tensors[f"scheduler.{name}.{index}"] = item
                    items.append(_tensor_spec(item))
                elif isinstance(item, _SCALARS):
                    items.append({"value": item})
                else:
                    return None
            description[name] = {"items": items, "tuple": isinstance(value, tuple)}
        else:
            return None
    return description, tensors


def restore_scheduler(
    scheduler: Any, description: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Put the state `scheduler_state` described back on `scheduler`. Instance state
    only: a name the class defines (a method, a property) or a dunder is refused."""
    bad = sorted(n for n in description if n.startswith("__") or hasattr(type(scheduler), n))
    if bad:
        raise ValueError(f"the point names what is not scheduler state: {bad}")

    def value(spec: dict[str, Any], key: str) -> Any:
        if "tensor" in spec:
            return tensors[key].to(spec["tensor"])
        return spec["value"]

    for name, spec in description.items():
        if "items" in spec:
            items = [value(item, f"scheduler.{name}.{i}") for i, item in enumerate(spec["items"])]
            setattr(scheduler, name, tuple(items) if spec["tuple"] else items)
        else:
            setattr(scheduler, name, value(spec, f"scheduler.{name}"))


class ResumeStore:
    """The resume points of one daemon, one file per job in `folder`.

    `every`: seconds of denoising between two points of a run (0: after every step).
    Nothing here raises on I/O trouble: a point that cannot be written or read costs the
    job its head start, never the job itself.
    """

    def __init__(self, folder: Path, every: float = 60.0) -> None:
        self.folder = Path(folder)
        self.every = every
        # Output files a run began to name and has not noted yet (media/claims.py).
        self.claims = ClaimLog(self.folder)

    def path(self, job_id: int) -> Path:
        return self.folder / f"{job_id}.safetensors"

    def write(
        self,
        job_id: int,
        mark: str,
        done: int,
        latents: torch.Tensor,
        scheduler: Any,
        step: int | None = None,
    ) -> bool:
        """Write the point after `done` pipeline steps (`step` of the job's steps, which
        differs for video-to-video); False when it was not written."""
        from safetensors.torch import save_file

        state = scheduler_state(scheduler)
        if state is None:
            return False
        description, scheduler_tensors = state
        # Copies on the host: the run goes on changing the device tensors, and
        # safetensors refuses tensors that share storage (timestep_list holds views).
        tensors = {
            name: tensor.detach().to("cpu", copy=True).contiguous()
            for name, tensor in {"latents": latents, **scheduler_tensors}.items()
        }
        header = {
            "format": FORMAT,
            "job": job_id,
            "fingerprint": mark,
            "done": done,
            "step": done if step is None else step,
            "latents": str(latents.device),
            "scheduler": description,
        }
        final = self.path(job_id)
        temp = self.folder / f".{job_id}.{secrets.token_hex(4)}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            save_file(tensors, str(temp), metadata={"wangend": json.dumps(header)})
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, final)
            fsync_dir(self.folder)
        except Exception as exc:  # OSError, and safetensors' own error for a full disk
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.warning("job %d: resume point not written: %s", job_id, why)
            return False
        finally:
            temp.unlink(missing_ok=True)
        return True

    def read(self, job_id: int, mark: str) -> ResumePoint | None:
        """The job's point when there is one written for `mark`; a point of another
        fingerprint, or one that cannot be read, is discarded."""
        path = self.path(job_id)
        if not path.is_file():
            return None
        try:
            header, tensors = _load(path, tensors=True)
            if header.get("format") != FORMAT or header.get("fingerprint") != mark:
                log.info("job %d: its resume point is for other settings; starting over", job_id)
                self.discard(job_id)
                return None
            latents = tensors.pop("latents").to(header["latents"])
            _check_complete(header["scheduler"], tensors)
            return ResumePoint(
                done=int(header["done"]),
                latents=latents,
                scheduler={"description": header["scheduler"], "tensors": tensors},
            )
        except Exception as exc:  # a damaged point must never cost the job
            log.warning("job %d: resume point %s unreadable (%s); starting over", job_id, path, exc)
            self.discard(job_id)
            return None

    def peek(self, job_id: int) -> int | None:
        """The job step the job's point holds, from its header alone; None without a
        readable point."""
        path = self.path(job_id)
        if not path.is_file():
            return None
        try:
            return int(_load(path, tensors=False)[0]["step"])
        except Exception:  # read() says why, when the job runs
            return None

    def outputs_path(self, job_id: int) -> Path:
        return self.folder / f"{job_id}.outputs.json"

    def record_outputs(self, job_id: int, paths: list[str]) -> None:
        """The job's outputs are written: note them (fsynced) before the queue records
        the success, so a kill in between does not run the job again."""
        try:
            replace_durably(self.outputs_path(job_id), json.dumps(paths).encode())
        except OSError as exc:
            log.warning("job %d: outputs not noted: %s", job_id, exc.strerror or exc)
            return  # the claims stay: the next attempt takes the files back
        self.claims.drop(job_id)

    def finished(self, job_id: int) -> bool:
        """An attempt of the job wrote and noted all its outputs: a rerun only returns
        them."""
        return self.recorded_outputs(job_id) is not None

    def recorded_outputs(self, job_id: int) -> list[str] | None:
        """The outputs an earlier attempt wrote, if all of them are still there."""
        try:
            paths = json.loads(self.outputs_path(job_id).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(paths, list) or not paths:
            return None
        if not all(isinstance(p, str) and Path(p).is_file() for p in paths):
            return None
        return paths

    def discard(self, job_id: int, succeeded: bool = False) -> None:
        """Forget everything about the job: its point, noted outputs and claims. Unless
        the job `succeeded` (its outputs are in its record), files a run named but never
        noted as outputs go too: the job ended without them."""
        if succeeded:
            self.claims.drop(job_id)
        else:
            self.claims.undo(job_id)
        for path in (self.path(job_id), self.outputs_path(job_id)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("job %d: %s not removed: %s", job_id, path, exc.strerror or exc)

    def jobs(self) -> list[int]:
        """Ids of the jobs that have a point, noted outputs or claims."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        ids = {int(m.group(1)) for name in names if (m := _FILE.fullmatch(name))}
        return sorted(ids)

    def sweep(self, keep: Collection[int]) -> list[int]:
        """Remove the points of jobs not in `keep` (ended or deleted while the daemon was
        down), and temp files a crash left; returns the ids removed."""
        gone = [job for job in self.jobs() if job not in keep]
        for job in gone:
            self.discard(job)
        try:
            for name in os.listdir(self.folder):
                if name.startswith(".") and name.endswith(".tmp"):
                    (self.folder / name).unlink(missing_ok=True)
        except OSError:
            pass
        return gone


def _load(path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A point's JSON header and, if asked, its tensors (on the host)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads((handle.metadata() or {})["wangend"])
        names = list(handle.keys()) if tensors else []
        return header, {name: handle.get_tensor(name) for name in names}


def _check_complete(description: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Raise KeyError naming the first tensor the description names and the file lacks."""
    for name, spec in description.items():
        items = spec.get("items", [spec])
        for index, item in enumerate(items):
            key = f"scheduler.{name}.{index}" if "items" in spec else f"scheduler.{name}"
            if "tensor" in item and key not in tensors:
                raise KeyError(key)


class RunResume:
    """One run's use of the store: the point it resumes from (if any) and when to write."""

    def __init__(self, store: ResumeStore, job_id: int, mark: str, offset: int = 0) -> None:
        """`offset`: job steps before the pipeline's first (video-to-video skips some)."""
        self.store = store
        self.job_id = job_id
        self.mark = mark
        self.offset = offset
        self.point = store.read(job_id, mark)
        self._saved = self.point.done if self.point is not None else 0
        self._last = time.monotonic()

    @property
    def skip(self) -> int:
        """Pipeline steps this run skips (finished by an earlier attempt)."""
        return self.point.done if self.point is not None else 0

    def restore(self, scheduler: Any) -> None:
        """Put the point's scheduler state on `scheduler` (after its set_timesteps)."""
        if self.point is not None:
            state = self.point.scheduler
            restore_scheduler(scheduler, state["description"], state["tensors"])

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.store.every

    def save(self, done: int, latents: torch.Tensor, scheduler: Any) -> None:
        """Write the point after `done` pipeline steps, unless it is already written."""
        if done <= self._saved:
            return
        started = time.monotonic()
        step = self.offset + done
        if self.store.write(self.job_id, self.mark, done, latents, scheduler, step=step):
            self._saved = done
            log.debug(
                "job %d: resume point at step %d (%.3f s)",
                self.job_id, done, time.monotonic() - started,
            )  # fmt: skip
        self._last = time.monotonic()

    def discard(self) -> None:
        self.store.discard(self.job_id)
