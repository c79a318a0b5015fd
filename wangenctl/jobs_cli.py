"""The commands that make jobs: `submit`, `matanyone`, and what helps write them
(`inspect`, `loras`, `presets`).

Paths given on the command line are made absolute here, because the daemon may run in
another working directory (or as another user under systemd) and resolves nothing
relative to the client; a path that does not exist is a usage error (exit 2) before the
daemon is asked anything. Only the options a user gives are sent: every other field takes
the daemon's (or the model's) default, which the reply then shows.

`submit --from FILE` starts from the settings stored in an output (embedded or in its
sidecar) and queues the same job again; with the same seed that gives the same frames.
`--dry-run` asks the daemon's `validate` instead of `enqueue`: every check is made and
the resolved job shown, and nothing is queued.
"""

from __future__ import annotations

import base64
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wangend.protocol import (
    AttentionBackend,
    Event,
    MatAnyOneSpec,
    MemoryProfile,
    MetadataMode,
    StepCache,
)

from .cli import DetachOpt, FollowOpt, Options, _enqueue_and_follow, _fail, _run, app
from .render import make_renderer

if TYPE_CHECKING:
    from .client import Client
    from .render import Renderer

__all__ = ["model_argument", "parse_lora", "preview_file_name"]

# The choices of the enumerated options come from the protocol's own types, so typer
# refuses a misspelt value (exit 2, naming the choices) before the daemon is asked.
MaskType = typing.get_type_hints(MatAnyOneSpec)["mask_type"]


def _file(help: str, *names: str) -> Any:
    """A typer option for an existing file, made absolute."""
    return typer.Option(*names, exists=True, dir_okay=False, resolve_path=True, help=help)


def parse_lora(text: str) -> dict[str, str]:
    """ "NAME" or "NAME:MULT" -> a LoraRef dict.

    The rule: MULT is everything after the LAST ':' and must look like a Wan2GP
    multiplier ("0.8" constant, "1,0.5" per-step, "1;0" per expert phase: digits, '.',
    ',', ';', signs, exponents, spaces); everything before it is the name, so a name may
    itself hold ':' ("a:b:0.5" is LoRA "a:b" at 0.5). Text without ':' is a name at the
    default multiplier. Anything else ("ink:", ":0.5", "ink:strong") is a usage error
    rather than a guess; the daemon checks the multiplier's meaning.
    """
    name, sep, mult = text.rpartition(":")
    if not sep:
        return {"name": text}
    if not name or not mult.strip() or not all(c in "0123456789.,;-+ eE" for c in mult):
        raise typer.BadParameter(
            f"{text!r}: expected NAME or NAME:MULTIPLIER (e.g. style:0.8, fast:1,0.5)",
            param_hint="--lora",
        )
    return {"name": name, "multiplier": mult}


def model_argument(model: str | None) -> str | None:
    """A --model written as a local path ("./wan", "../models/wan", "~/wan", or
    "models/wan" when that folder exists here) goes to the daemon absolute, like every
    other path; names and hub ids ("tiny", "org/name") go as typed."""
    if model is None:
        return None
    path = Path(os.path.expanduser(model))
    if str(path).startswith("~"):
        return model  # "~nobody/wan": the daemon says why it cannot expand it
    if (
        model.startswith(("./", "../", "~"))
        or model in (".", "..")
        or ("/" in model and path.is_dir())
    ):
        return os.path.abspath(path)
    if "/" not in model and (path / "model_index.json").is_file():
        typer.echo(
            f"note: --model {model} names a model the daemon knows by that name (its models "
            f"folder); for the folder here, write --model ./{model}",
            err=True,
        )
    return model


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _paths(fields: dict[str, Path | list[Path] | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, list):
            if value:
                out[key] = [str(Path(p).absolute()) for p in value]
        elif value is not None:
            out[key] = str(Path(value).absolute())
    return out


def preview_file_name(job: int, step: int) -> str:
    """`<job>-<step>.jpg`: a job's later attempt overwrites its earlier one."""
    return f"{job}-{step}.jpg"


class _PreviewSaver:
    """Writes each preview JPEG of a followed job to a folder (`--save-previews`).

    It runs before the renderer sees the event, so the JPEG is on disk when the progress
    line says a preview arrived. A preview that does not decode is skipped with a notice
    rather than ending the follow: the job itself is unaffected.
    """

    def __init__(self, folder: Path, out: Renderer) -> None:
        self.folder = folder
        self.out = out

    def __call__(self, event: Event) -> None:
        preview = event.data.get("preview") if event.type == "job.progress" else None
        if not isinstance(preview, dict) or event.job is None:
            return
        step = int(preview.get("step") or event.data.get("step") or 0)
        try:
            data = base64.b64decode(str(preview.get("data", "")), validate=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / preview_file_name(event.job, step)).write_bytes(data)
        except (ValueError, OSError) as exc:
            self.out.notice(f"preview of job {event.job} step {step} not saved: {exc}")


def _queue(
    ctx: typer.Context,
    spec: dict[str, Any],
    *,
    dry_run: bool,
    follow: bool,
    detach: bool,
    save_previews: Path | None,
) -> None:
    opts: Options = ctx.obj

    async def work(c: Client, out: Renderer) -> int:
        saver = _PreviewSaver(save_previews, out) if save_previews is not None else None
        if dry_run:
            out.validated(await c.validate(spec))
            return 0
        return await _enqueue_and_follow(
            c, out, opts, lambda: c.enqueue(spec), follow, detach, on_event=saver
        )

    _run(ctx, work)


def _from_file(ctx: typer.Context, path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from .inspect import spec_from_settings

    try:
        return spec_from_settings(_read_settings(ctx, path), overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--from") from None


def _read_settings(ctx: typer.Context, path: Path) -> dict[str, Any]:
    from .errors import WangenctlError
    from .inspect import read_settings

    opts: Options = ctx.obj
    try:
        return read_settings(path)
    except WangenctlError as exc:
        _fail(make_renderer(opts.json), exc, 1)


@app.command()
def submit(
    ctx: typer.Context,
    prompt: Annotated[
        str | None, typer.Argument(metavar="PROMPT", help="what the video shows")
    ] = None,
    model: Annotated[str | None, typer.Option(help="registry name, hub id or folder")] = None,
    negative: Annotated[str | None, typer.Option(help="negative prompt")] = None,
    width: Annotated[
        int | None, typer.Option(help="pixels, a multiple of 16 (32 for Wan 2.2 TI2V)")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="pixels, a multiple of 16 (32 for Wan 2.2 TI2V)")
    ] = None,
    frames: Annotated[int | None, typer.Option(help="frame count, 4k+1")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps, 1 to 500")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale")] = None,
    seed: Annotated[int | None, typer.Option(help="random when left out; recorded")] = None,
    fps: Annotated[int | None, typer.Option(help="frames per second of the file")] = None,
    flow_shift: Annotated[float | None, typer.Option(help="scheduler flow shift")] = None,
    output_name: Annotated[
        str | None, typer.Option(help="file name template: {job} {seed} {model} {date} ...")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="-1000..1000, higher runs first")] = None,
    image: Annotated[Path | None, _file("start frame (image-to-video models)")] = None,
    last_image: Annotated[Path | None, _file("end frame")] = None,
    video: Annotated[Path | None, _file("source (V2V) or control video (VACE)")] = None,
    mask: Annotated[Path | None, _file("VACE mask (video or image)")] = None,
    ref: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            resolve_path=True,
            metavar="FILE",
            help="VACE reference image (repeat for more)",
        ),
    ] = None,
    strength: Annotated[float | None, typer.Option(help="V2V: how much is renoised, 0..1")] = None,
    guidance2: Annotated[float | None, typer.Option(help="Wan 2.2: low-noise guidance")] = None,
    boundary: Annotated[float | None, typer.Option(help="Wan 2.2: expert boundary 0..1")] = None,
    profile: Annotated[MemoryProfile | None, typer.Option(help="memory profile")] = None,
    fp8: Annotated[bool | None, typer.Option("--fp8/--no-fp8", help="float8 weights")] = None,
    cache: Annotated[StepCache | None, typer.Option(help="step cache")] = None,
    cache_threshold: Annotated[float | None, typer.Option(help="step cache threshold")] = None,
    attention: Annotated[AttentionBackend | None, typer.Option(help="attention kernels")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="regional torch.compile")
    ] = None,
    preview_every: Annotated[int | None, typer.Option(help="a preview every N steps")] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME[:MULT]", help="a LoRA and its multiplier (repeat for more)"),
    ] = None,
    preset: Annotated[str | None, typer.Option(help="a LoRA preset (`wangenctl presets`)")] = None,
    enhance: Annotated[
        bool | None, typer.Option("--enhance/--no-enhance", help="prompt enhancer on/off")
    ] = None,
    audio: Annotated[Path | None, _file("audio (or a video with sound) to add")] = None,
    metadata: Annotated[
        MetadataMode | None, typer.Option(help="settings in the file, in a .json, or not kept")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from", exists=True, dir_okay=False, help="queue the job an output was made by"
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check and show the job; queue nothing")
    ] = False,
    save_previews: Annotated[
        Path | None,
        typer.Option(
            file_okay=False, help="with --follow: write each preview as DIR/<job>-<step>.jpg"
        ),
    ] = None,
    follow: FollowOpt = False,
    detach: DetachOpt = False,
) -> None:
    """Queue a generation and print its job id (with --follow: the id and progress on
    stderr, then only the output paths on stdout).

    Ctrl-C while following aborts the job, unless --detach. With --from FILE the prompt is
    optional and every option given overrides the stored one.
    """
    fields = _given(
        {
            "prompt": prompt,
            "model": model_argument(model),
            "negative_prompt": negative,
            "width": width,
            "height": height,
            "frames": frames,
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "fps": fps,
            "flow_shift": flow_shift,
            "output_name": output_name,
            "priority": priority,
            "strength": strength,
            "guidance_scale_2": guidance2,
            "boundary_ratio": boundary,
            "memory_profile": profile,
            "fp8": fp8,
            "step_cache": cache,
            "step_cache_threshold": cache_threshold,
            "attention": attention,
            "compile": compile,
            "preview_every": preview_every,
            "preset": preset,
            "enhance_prompt": enhance,
            "metadata": metadata,
        }
    )
    fields |= _paths(
        {
            "image": image,
            "last_image": last_image,
            "video": video,
            "mask": mask,
            "reference_images": ref,
            "audio": audio,
        }
    )
    if lora:
        fields["loras"] = [parse_lora(item) for item in lora]
    if save_previews is not None and not follow and not dry_run:
        raise typer.BadParameter("previews are saved while following: add --follow")
    if from_file is not None:
        spec = _from_file(ctx, from_file, fields)
        if spec.get("kind") != "generate":
            raise typer.BadParameter(
                f"{from_file} was made by a {spec.get('kind')} job; use `wangenctl matanyone "
                "--from` for it",
                param_hint="--from",
            )
    elif prompt is None:
        raise typer.BadParameter("a prompt is needed (or --from FILE)", param_hint="PROMPT")
    else:
        spec = fields
    _queue(ctx, spec, dry_run=dry_run, follow=follow, detach=detach, save_previews=save_previews)


@app.command()
def matanyone(
    ctx: typer.Context,
    input: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, resolve_path=True, help="video or image"),
    ] = None,
    mask: Annotated[Path | None, _file("first-frame mask image (white = keep)")] = None,
    model: Annotated[str | None, typer.Option(help="weights: tiny, a file or a hub id")] = None,
    start: Annotated[int | None, typer.Option(help="first frame (0-based)")] = None,
    end: Annotated[int | None, typer.Option(help="frame to stop before")] = None,
    erode: Annotated[int | None, typer.Option(help="erode the mask by R pixels")] = None,
    dilate: Annotated[int | None, typer.Option(help="dilate the mask by R pixels")] = None,
    warmup: Annotated[int | None, typer.Option(help="warm-up passes on the first frame")] = None,
    max_size: Annotated[int | None, typer.Option(help="longest side processed")] = None,
    type: Annotated[MaskType | None, typer.Option("--type", help="what is written")] = None,
    zip: Annotated[bool, typer.Option("--zip", help="also a ZIP of RGBA PNG frames")] = False,
    no_audio: Annotated[bool, typer.Option("--no-audio", help="leave the sound out")] = False,
    output_name: Annotated[str | None, typer.Option(help="file name template")] = None,
    metadata: Annotated[
        MetadataMode | None, typer.Option(help="settings in the file, in a .json, or not kept")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="-1000..1000, higher runs first")] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from", exists=True, dir_okay=False, help="repeat a matting output's job"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check and show the plan; queue nothing")
    ] = False,
    follow: FollowOpt = False,
    detach: DetachOpt = False,
) -> None:
    """Queue a MatAnyone matting run: cut the masked subject out of a video.

    Outputs land in <output dir>/mask_outputs/.
    """
    fields = _given(
        {
            "model": model,
            "start_frame": start,
            "end_frame": end,
            "erode": erode,
            "dilate": dilate,
            "warmup": warmup,
            "max_size": max_size,
            "mask_type": type,
            "rgba_zip": True if zip else None,
            "reattach_audio": False if no_audio else None,
            "output_name": output_name,
            "metadata": metadata,
            "priority": priority,
        }
    )
    fields |= _paths({"input": input, "mask": mask})
    if from_file is not None:
        spec = _from_file(ctx, from_file, fields)
        if spec.get("kind") != "matanyone":
            raise typer.BadParameter(
                f"{from_file} was not made by a matting job", param_hint="--from"
            )
    else:
        if input is None or mask is None:
            raise typer.BadParameter("--input and --mask are needed (or --from FILE)")
        spec = {"kind": "matanyone", **fields}
    _queue(ctx, spec, dry_run=dry_run, follow=follow, detach=detach, save_previews=None)


@app.command()
def inspect(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, metavar="FILE", help="an output")
    ],
) -> None:
    """Show the settings an output was made with (no daemon needed)."""
    opts: Options = ctx.obj
    make_renderer(opts.json).settings(str(file), _read_settings(ctx, file))


@app.command()
def loras(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="list for this model's family")] = None,
    state: Annotated[bool, typer.Option(help="also what the warm pipeline holds")] = False,
) -> None:
    """The LoRAs the daemon finds for a model (default: its default model)."""

    async def work(c: Client, out: Renderer) -> None:
        out.loras(await c.loras(model_argument(model), state))

    _run(ctx, work)


@app.command()
def presets(ctx: typer.Context) -> None:
    """The LoRA presets the daemon finds."""

    async def work(c: Client, out: Renderer) -> None:
        out.presets(await c.presets())

    _run(ctx, work)
