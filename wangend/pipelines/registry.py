"""Model records: which models wangend knows, where their files come from, what inputs
each one takes, and the defaults and size rules it brings.

A job names its model in one of five ways, tried in this order:

1. a built-in name: a real Wan model ("wan2.1-t2v-1.3b", ..., "wan2.2-ti2v-5b", loaded
   from the hub cache) or a tiny offline one ("tiny", "tiny-i2v", ... built on first use);
1b. a `[models.NAME]` of the config: single-file transformer checkpoints (ComfyUI's,
   Wan2GP's) on a base model that supplies the rest (checkpoints.py);
2. a diffusers folder dropped into the models directory, named by its folder name;
3. a path to a diffusers folder (one with model_index.json): absolute, `~/...`, or
   relative (`./wan`, `../wan`, or `models/wan` when that folder exists), read from the
   daemon's working directory; jobs record it absolute;
4. a Hugging Face hub id ("org/name"), loaded from the local cache or downloaded.

Where a folder is expected, a Hugging Face cache folder (`models--Org--Name`) stands for
the snapshot its refs/main names (folders.snapshot_folder).

Anything else is refused at enqueue time with ModelUnavailable, and a local folder is
checked then too, so a job never waits in the queue only to fail at load: for its parts
(a missing `transformer/`), for weights cut short (their headers), and for parts that do
not fit together (folders.conflicts: a pipeline class its transformer cannot run, half
of Wan 2.2's keys, a scheduler the pipelines cannot drive). A folder's family is read
from its own files (model_index.json's `_class_name`, `transformer_2`, `image_encoder`,
`boundary_ratio`, `expand_timesteps`, the VAE's `z_dim`), so a Wan folder wangend never
saw still gets the right inputs, defaults and size rules. Checks here are cheap (stat
calls, small JSON reads, the weights' headers): the registry is asked on every enqueue
and by `models`, both off the event loop.

Video-to-video has no name of its own: any Wan 2.1 T2V model given a `video` runs
through `WanVideoToVideoPipeline` built on the same loaded components.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path

import msgspec

from ..config import ConfigError, ModelFiles
from ..errors import ModelUnavailable
from ..protocol import ModelInfo
from .catalog import (
    CONDITIONAL_FIELDS,
    FAMILIES,
    FAMILY_DEFAULTS,
    HUB_ID,
    SUPPORTED_PIPELINES,
    TINY_DEFAULTS,
    TINY_MARKER,
    WAN21_T2V,
    WAN_1_3B_DEFAULTS,
    Capabilities,
    ModelDefaults,
    ModelRecord,
    SizeRules,
    builtin_records,
    family_record,
)
from .checkpoints import CheckpointProblem, check_file
from .folders import (
    check_folder,
    conflicts,
    damaged_weights,
    detect,
    hub_cached,
    hub_reader,
    is_model_folder,
    read_json,
    snapshot_folder,
)

__all__ = [
    "CONDITIONAL_FIELDS",
    "FAMILIES",
    "Capabilities",
    "ModelDefaults",
    "ModelRecord",
    "ModelRegistry",
    "SizeRules",
    "check_folder",
    "detect",
]


class ModelRegistry:
    """Resolves model names to records; owns no loaded weights (production.py does)."""

    def __init__(self, models_dir: Path, files: Mapping[str, ModelFiles] | None = None) -> None:
        self.models_dir = Path(models_dir).expanduser().absolute()
        self._builtins = builtin_records(self.models_dir)
        self._files: dict[str, ModelFiles] = {}
        self.set_files(files or {})

    def set_files(self, files: Mapping[str, ModelFiles]) -> None:
        """The config's [models.NAME] tables (again, on SIGHUP). Jobs already queued keep
        the files they were queued with (runtime.py)."""
        clash = sorted(files.keys() & self._builtins.keys())
        if clash:
            raise ConfigError(
                f"models.{clash[0]}: {clash[0]} is the name of a built-in model; pick another"
            )
        self._files = dict(files)  # one assignment: a resolve never sees half of it

    @property
    def names(self) -> list[str]:
        return list(self._builtins)

    @property
    def builtins(self) -> list[ModelRecord]:
        return list(self._builtins.values())

    def resolve(self, name: str, replaced: Collection[str] = ()) -> ModelRecord:
        """The record for `name`; ModelUnavailable says what was tried when none fits.
        `replaced`: components whose weights a [models.NAME] model brings as files, so a
        local folder needs only their config.json."""
        name = name.strip()
        if name in self._builtins:
            return self._builtins[name]
        if name in self._files:
            return self._with_files(name, self._files[name])
        for record in self._builtins.values():
            if record.kind == "hub" and record.source == name:
                return record
        path = written_path(name)
        if path is not None:
            return self._local(path, name=str(path), replaced=replaced)
        if name and "/" not in name and not name.startswith("."):  # as `models` lists it
            folder = self.models_dir / name
            if is_model_folder(folder):
                return self._local(folder, name=name, replaced=replaced)
        if "/" in name and Path(name).is_dir():
            # A folder relative to the working directory wins over a hub id of the same
            # spelling, as in diffusers' own from_pretrained.
            path = Path(os.path.abspath(name))
            return self._local(path, name=str(path), replaced=replaced)
        if HUB_ID.match(name) and ".." not in name:
            return self._hub(name)
        raise ModelUnavailable(
            f"unknown model {name!r}: not a built-in name ({', '.join(self._builtins)}), "
            f"not a model folder in {self.models_dir}, not an absolute path to a diffusers "
            "folder and not a Hugging Face hub id (org/name)",
            {"model": name},
        )

    def _hub(self, repo_id: str) -> ModelRecord:
        """A hub id we have no record for: its family from the cached model_index.json
        when there is one, else Wan 2.1 T2V (the commonest fine-tune base)."""
        read = hub_reader(repo_id)
        index = read("model_index.json")
        problems = conflicts(index, read) if index else []
        if problems:
            raise ModelUnavailable(
                f"model {repo_id} (Hugging Face cache) does not fit together: "
                f"{'; '.join(problems)}",
                {"model": repo_id, "conflicts": problems},
            )
        facts = detect(index, read) if index else {"family": WAN21_T2V}
        if facts.get("pipeline") not in SUPPORTED_PIPELINES:
            facts["pipeline"] = None
        family = facts.pop("family")
        return family_record(
            name=repo_id, source=repo_id, kind="hub", description="Hugging Face hub model",
            family=family, defaults=FAMILY_DEFAULTS[family], **facts,
        )  # fmt: skip

    def _local(self, folder: Path, name: str, replaced: Collection[str] = ()) -> ModelRecord:
        folder = folder.absolute()
        if folder.is_file():
            raise ModelUnavailable(
                f"model {folder} is a file, not a diffusers folder; a single transformer "
                "file (ComfyUI's, Wan2GP's) becomes a model through a [models.NAME] table "
                "naming it and a base model (docs/engine.md)",
                {"model": name},
            )
        if not folder.is_dir():
            raise ModelUnavailable(f"model folder {folder} does not exist", {"model": name})
        folder, problem = snapshot_folder(folder)
        if problem:
            raise ModelUnavailable(f"model folder {folder}: {problem}", {"model": name})
        index = read_json(folder / "model_index.json")
        if index is None and (folder / "model_index.json").is_file():
            raise ModelUnavailable(
                f"model folder {folder}: model_index.json is not a JSON object", {"model": name}
            )
        pipeline, missing = check_folder(folder, replaced)
        if missing:
            raise ModelUnavailable(
                f"model folder {folder} is incomplete: missing {', '.join(missing)}",
                {"model": name, "missing": missing},
            )
        if pipeline not in SUPPORTED_PIPELINES:
            named = f"a {pipeline} pipeline" if pipeline else "no pipeline (_class_name)"
            raise ModelUnavailable(
                f"model folder {folder}: its model_index.json names {named}; wangend runs "
                f"{', '.join(SUPPORTED_PIPELINES)}",
                {"model": name},
            )

        def read(part: str) -> dict | None:
            return read_json(folder / part)

        problems = conflicts(index or {}, read)
        if problems:
            raise ModelUnavailable(
                f"model folder {folder} does not fit together: {'; '.join(problems)}",
                {"model": name, "conflicts": problems},
            )
        damaged = damaged_weights(folder, replaced)  # headers: a few KB a file
        if damaged:
            raise ModelUnavailable(
                f"model folder {folder} has damaged weights: {'; '.join(damaged)}",
                {"model": name, "damaged": damaged},
            )
        facts = detect(index or {}, read)
        family = facts.pop("family")
        tiny = (folder / TINY_MARKER).is_file()
        defaults = TINY_DEFAULTS if tiny else FAMILY_DEFAULTS[family]
        scheduler = read_json(folder / "scheduler" / "scheduler_config.json") or {}
        shift = scheduler.get("flow_shift", scheduler.get("shift"))
        if isinstance(shift, int | float) and shift > 0:
            defaults = msgspec.structs.replace(defaults, flow_shift=float(shift))
        return family_record(
            name=name, source=str(folder), kind="local", family=family,
            description=f"local diffusers folder {folder} ({family})", defaults=defaults, **facts,
        )  # fmt: skip

    def _with_files(self, name: str, spec: ModelFiles) -> ModelRecord:
        """A [models.NAME] model: its base's record with the transformer file(s) in place
        of the base's own weights. Each file's header is read and checked against the
        base's transformer config (when that is on disk) here, before any job queues."""
        if spec.base in self._files:
            raise ModelUnavailable(
                f"model {name}: base {spec.base} is itself a [models.*] model; name a "
                "built-in model, a diffusers folder or a hub id",
                {"model": name},
            )
        wanted = ("transformer", "transformer_2") if spec.transformer_2 else ("transformer",)
        try:
            base = self.resolve(spec.base, replaced=wanted)
        except ModelUnavailable as exc:
            raise ModelUnavailable(f"model {name}: base {exc.message}", {"model": name}) from None
        parts = [("transformer", spec.transformer)]
        if spec.transformer_2:
            if not base.two_experts:
                raise ModelUnavailable(
                    f"model {name}: transformer_2 is the low-noise expert of a Wan 2.2 A14B "
                    f"model, but base {base.name} has one transformer",
                    {"model": name},
                )
            parts.append(("transformer_2", spec.transformer_2))
        read = (
            hub_reader(base.source)
            if base.kind == "hub"
            else (lambda p: read_json(Path(base.source) / p))
        )
        for part, path in parts:
            try:
                check_file(Path(path), read(f"{part}/config.json"), base.name)
            except CheckpointProblem as exc:
                raise ModelUnavailable(f"model {name}: {exc}", {"model": name}) from None
        which = "transformer files" if len(parts) > 1 else "a transformer file"
        return msgspec.structs.replace(
            base,
            name=name,
            description=spec.description or f"{which} on {base.name} ({base.family})",
            files=tuple(parts),
        )

    def unusable(self, names: Iterable[str]) -> dict[str, str]:
        """name -> why, for each of `names` that does not resolve now (what `serve` and
        `config check` warn about: the daemon starts anyway, and jobs naming these are
        refused until they can be used)."""
        problems: dict[str, str] = {}
        for name in names:
            try:
                self.resolve(name)
            except ModelUnavailable as exc:
                problems[name] = exc.message
        return problems

    def available(self, record: ModelRecord) -> bool:
        """On disk, in the HF cache, or buildable offline (tiny)."""
        replaced = dict(record.files)
        try:
            if not all(Path(path).is_file() for path in replaced.values()):
                return False
        except OSError:  # a folder the daemon's user cannot enter
            return False
        if record.tiny:
            return True
        if record.kind == "hub":
            experts = ("transformer", "transformer_2") if record.two_experts else ("transformer",)
            return hub_cached(record.source, [p for p in experts if p not in replaced])
        return not check_folder(Path(record.source), replaced)[1]

    def accepting(self, field: str) -> list[str]:
        """Built-in model names that take `field` (for error messages)."""
        return [r.name for r in self._builtins.values() if field in r.capabilities.accepts]

    def list(self, default: str | None = None, loaded: str | None = None) -> list[ModelInfo]:
        """Built-in models, then folders in the models directory (broken ones included,
        marked unavailable, so a user sees why their folder does not work), then the
        default and the loaded model when they are neither (a path or a hub id)."""
        entries = [(r, self.available(r)) for r in self._builtins.values()]
        for name in self._files:
            entries.append(
                self._entry(name, self._files[name].transformer, lambda n=name: self.resolve(n))
            )
        if self.models_dir.is_dir():
            for folder in sorted(self.models_dir.iterdir()):
                if folder.name.startswith(".") or folder.name in self._builtins:
                    continue
                if folder.name in self._files:  # the [models.NAME] of that name wins
                    continue
                if not is_model_folder(folder):
                    continue
                entries.append(
                    self._entry(folder.name, str(folder), lambda f=folder: self._local(f, f.name))
                )
        if default:  # as jobs record it: "~/wan" is listed as /home/me/wan
            default = self._entry(default, default, lambda: self.resolve(default))[0].name
        names = {r.name for r, _ok in entries}
        for extra in (default, loaded):
            if extra and extra not in names:
                entries.append(self._entry(extra, extra, lambda e=extra: self.resolve(e)))
                names.add(extra)
        return [
            ModelInfo(
                name=r.name,
                source=r.source,
                family=r.family,
                description=r.description,
                available=ok,
                loaded=loaded is not None and loaded == r.name,
                default=default is not None and default == r.name,
                accepts=list(r.capabilities.accepts),
                requires=list(r.capabilities.requires),
                files=dict(r.files),
            )
            for r, ok in entries
        ]

    def _entry(
        self, name: str, source: str, make: Callable[[], ModelRecord]
    ) -> tuple[ModelRecord, bool]:
        """(record, available) for the `models` listing; a model that does not resolve
        is listed with the reason as its description."""
        try:
            record = make()
        except ModelUnavailable as exc:
            broken = ModelRecord(
                name=name,
                family="unknown",
                source=source,
                kind="local",
                description=exc.message,
                defaults=WAN_1_3B_DEFAULTS,
            )
            return broken, False
        return record, self.available(record)


def written_path(name: str) -> Path | None:
    """`name` as an absolute path when it is written as a path: absolute, `~/...`, or
    relative from `.` or `..` (read from the daemon's working directory, like the config's
    other relative paths). Lexically normalised, symlinks kept: the name a job records."""
    if not name.startswith(("/", "~", "./", "../")) and name not in (".", ".."):
        return None
    expanded = os.path.expanduser(name)
    if expanded.startswith("~"):
        raise ModelUnavailable(
            f"model path {name!r}: cannot expand {name.split('/')[0]!r} (no such user)",
            {"model": name},
        )
    return Path(os.path.abspath(expanded))
