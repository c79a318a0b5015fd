"""Engine figures on the real-size Wan 2.1 T2V 1.3B architecture, through a real daemon.

Random weights (no download), saved once as a diffusers folder (safetensors) under
`--folder` and reused by later runs: the transformer has the released checkpoint's
architecture (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, numbers below),
the VAE the released architecture (AutoencoderKLWan defaults), the text encoder the
released UMT5-XXL shape (24 layers, 4096 wide, 256384 tokens; `--text-encoder small`
makes it one layer), so load times and peak memory are those of the real model.

Every figure comes from jobs run by a `Daemon` in this process, driven over its Unix
socket the way any client drives it; "plain" is a diffusers call on the daemon's own
warm pipeline, interleaved with the jobs so drift hits both sides alike. bf16. Sections
(`--sections`, default: daemon profiles caches; give fewer to fit a time limit):

* daemon: s/step (median time between step events) of jobs against plain calls at
  480x832, 33 and 81 frames; whether the frames are identical (the job's recorded
  frames_sha256 against the plain frames); cold load vs warm reuse; job taken from the
  queue -> first step, on a warm model.
* profiles: peak VRAM and s/step per memory profile (none, model, group, sequential),
  fp8 storage, and group + fp8; PSNR against the `none` output.
* caches: speed-up of the denoising loop and PSNR against the uncached output for each
  step cache, over `--cache-steps` steps (random weights: the caches' skip decisions
  differ from a trained model's; read these as the mechanism's figures, not quality).
* attention: s/step per attention backend that is installed (flash, sage).
* compile: regional compile: the first job (pays the compile) and the next one's s/step.

Without CUDA it prints "skipped: no CUDA" and exits 0; `--smoke` then runs the chosen
sections on the CPU at 64x64, 5 frames, with the one-layer text encoder: a check that
the script works, its figures mean nothing.

    .venv/bin/python bench/gpu_step.py                       # on a CUDA machine
    .venv/bin/python bench/gpu_step.py --sections caches --cache-steps 30
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from engine_common import Line, plain_call, psnr, running_daemon  # bench/ on the path

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
WAN21_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# text_encoder/config.json of the same checkpoint (google/umt5-xxl's encoder).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
SECTIONS = ("daemon", "profiles", "caches", "attention", "compile")
PROFILES = ("none", "none+fp8", "model", "group", "group+fp8", "sequential")
PROMPT = "a red fox runs through fresh snow, morning light"


def build_folder(folder: Path, text_encoder: str, device: str) -> None:
    """Save a real-size random WanPipeline as a diffusers folder, once (a marker file
    says the save finished). The big modules are made on `device`: initialising the
    5.7B-parameter text encoder there takes seconds, on a CPU minutes."""
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == text_encoder:
        return
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from wangend.pipelines.tiny import build_tokenizer

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    shape = dict(UMT5_XXL)
    if text_encoder == "small":
        shape.update(vocab_size=len(tokenizer), num_layers=1, num_heads=4, d_ff=256)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            encoder = UMT5EncoderModel(
                UMT5Config(**shape, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
            )
            transformer = WanTransformer3DModel(**WAN21_1_3B)
    finally:
        torch.set_default_dtype(default)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=AutoencoderKLWan(),
        transformer=transformer,
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, encoder, transformer
    free_memory()
    marker.write_text(text_encoder)
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def median_step(times: list[float]) -> float:
    """Median time between consecutive step ends: the denoising step alone, without the
    text encoding before it or the VAE decode after it."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return statistics.median(gaps) if gaps else float("nan")


def decode(path: str) -> np.ndarray:
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class JobRun:
    """What one job did, from its events as a client received them."""

    def __init__(self, job: int, events: list[tuple[float, dict[str, Any]]]) -> None:
        self.job = job
        self.events = events
        self.final = events[-1][1]

    def first(self, kind: str, **data: Any) -> float | None:
        for at, event in self.events:
            if event["type"] == kind and all(event["data"].get(k) == v for k, v in data.items()):
                return at
        return None

    @property
    def ok(self) -> bool:
        return self.final["type"] == "job.succeeded"

    @property
    def why(self) -> str:
        error = self.final["data"].get("error") or {}
        return f"{error.get('type', self.final['type'])}: {error.get('message', '')}"[:100]

    @property
    def step_ends(self) -> list[float]:
        return [
            at
            for at, e in self.events
            if e["type"] == "job.progress"
            and e["data"].get("phase") == "denoising"
            and e["data"].get("step", 0) > 0
        ]

    @property
    def denoise_seconds(self) -> float:
        start = self.first("job.progress", phase="denoising")
        end = self.first("job.progress", phase="decoding")
        return (end - start) if start is not None and end is not None else float("nan")

    def final_seconds(self) -> float:
        """From being taken off the queue to its end."""
        taken = self.first("job.started")
        return self.events[-1][0] - taken if taken is not None else float("nan")

    @property
    def frames(self) -> np.ndarray:
        return decode(self.final["data"]["outputs"][0])

    @property
    def metadata(self) -> dict[str, Any]:
        from wangend.media.writers import read_video_metadata

        return read_video_metadata(Path(self.final["data"]["outputs"][0])) or {}


class Bench:
    """A daemon on the random model, a client on its socket, and the table of figures."""

    def __init__(self, daemon: Any, client: Line, size: dict[str, int]) -> None:
        self.daemon = daemon
        self.client = client
        self.size = size
        self.rows: list[tuple[str, str]] = []
        self.jobs = 0  # names each job's output

    def row(self, key: str, value: str) -> None:
        self.rows.append((key, value))
        print(f"  {key}: {value}", flush=True)

    def job(self, frames: int, steps: int, **settings: Any) -> JobRun:
        self.jobs += 1
        spec = {
            "prompt": PROMPT,
            "seed": 1,  # the same noise for every job, so outputs compare
            "steps": steps,
            "frames": frames,
            **self.size,
            "output_name": f"bench-{self.jobs}",
            **settings,
        }
        reply, _ = self.client.call("enqueue", spec)
        if "error" in reply:
            raise RuntimeError(f"enqueue refused: {reply['error']}")
        job = reply["result"]["job"]
        events: list[tuple[float, dict[str, Any]]] = []
        while True:
            event, at = self.client.until(
                lambda e: job in (e.get("job"), (e.get("data") or {}).get("job"))
            )
            events.append((at, event))
            if event["type"] in ("job.succeeded", "job.failed", "job.aborted"):
                return JobRun(job, events)

    def plain(self, frames: int, steps: int) -> tuple[np.ndarray, list[float]]:
        """The same job as a plain diffusers call on the daemon's warm pipeline."""
        from wangend.protocol import GenerateSpec

        job = self.daemon.engine.resolve(
            GenerateSpec(prompt=PROMPT, seed=1, steps=steps, frames=frames, **self.size)
        )
        ends: list[float] = []

        def on_step_end(_pipe: Any, _i: int, _t: Any, _tensors: dict) -> dict:
            ends.append(time.perf_counter())
            return {}

        return plain_call(self.daemon.engine.production.pipeline, job, on_step_end), ends

    def fresh(self) -> None:
        """Drop the warm pipeline and zero the peak counter: the next job loads anew and
        its peak is its own."""
        self.daemon.engine.production.release()
        free_memory()
        reset_peak()

    # --- sections ---------------------------------------------------------------------

    def section_daemon(self, frame_counts: list[int], steps: int, rounds: int) -> None:
        print("daemon: s/step through the daemon vs plain diffusers", flush=True)
        self.fresh()
        cold = self.job(frame_counts[0], steps)
        if not cold.ok:
            self.row("first job", f"failed: {cold.why}")
            return
        loaded = next(e for _, e in cold.events if e["type"] == "model.loaded")
        self.row("load cold (from disk)", f"{loaded['data'].get('seconds', float('nan')):.1f} s")
        warm = self.job(frame_counts[0], steps)
        load_warm = warm.metadata.get("timings", {}).get("load", float("nan"))
        self.row("load warm (reuse)", f"{load_warm * 1e6:.0f} us")
        taken = warm.first("job.started")
        began = warm.first("job.progress", phase="denoising")
        step1 = warm.first("job.progress", phase="denoising", step=1)
        if taken is not None and began is not None and step1 is not None:
            self.row(
                f"{frame_counts[0]}f warm: taken -> first step starts / ends",
                f"{began - taken:.3f} s / {step1 - taken:.3f} s",
            )
        for frames in frame_counts:
            self.plain(frames, 2)  # warm-up at this size (kernels, allocator)
            ran, plain = [], []
            same = True
            for _ in range(rounds):
                run = self.job(frames, steps)
                if not run.ok:
                    self.row(f"{frames}f job", f"failed: {run.why}")
                    break
                ran.append(median_step(run.step_ends))
                out, ends = self.plain(frames, steps)
                plain.append(median_step(ends))
                sha = hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()
                same = same and run.metadata.get("frames_sha256") == sha
            if ran:
                d, p = statistics.median(ran), statistics.median(plain)
                self.row(
                    f"{frames}f s/step daemon / plain",
                    f"{d:.3f} / {p:.3f} (x{d / p:.3f}, {rounds} rounds), "
                    f"frames {'identical' if same else 'differ'}",
                )

    def section_profiles(self, frames: int, steps: int, names: list[str]) -> None:
        print(f"profiles: peak VRAM and s/step at {frames} frames", flush=True)
        reference: np.ndarray | None = None
        for choice in names:
            profile, _, extra = choice.partition("+")
            fp8 = extra == "fp8"
            name = f"{profile}{' + fp8' if fp8 else ''}"
            self.fresh()
            run = self.job(frames, steps, memory_profile=profile, fp8=fp8)
            if not run.ok:
                self.row(f"{frames}f {name}", f"failed: {run.why}")
                continue
            peak = peak_gib()
            out = run.frames
            if reference is None:  # the first one listed ("none" by default)
                reference = out
            self.row(
                f"{frames}f {name}",
                f"{median_step(run.step_ends):.3f} s/step, peak "
                + (f"{peak:.2f} GiB" if peak is not None else "n/a (no CUDA)")
                + f", PSNR vs {names[0]} {psnr(out, reference):.1f} dB",
            )
        self.fresh()

    def section_caches(self, frames: int, steps: int) -> None:
        print(f"caches: {steps} steps at {frames} frames", flush=True)
        base = self.job(frames, steps)
        reference, seconds = base.frames, base.denoise_seconds
        self.row(f"{frames}f uncached denoising", f"{seconds:.2f} s")
        self.job(frames, steps, step_cache="mag")  # the first mag run measures its ratios
        for cache in ("fbc", "mag", "taylorseer", "pab"):
            run = self.job(frames, steps, step_cache=cache)
            if not run.ok:
                self.row(f"{frames}f cache {cache}", f"failed: {run.why}")
                continue
            self.row(
                f"{frames}f cache {cache}",
                f"x{seconds / run.denoise_seconds:.2f}, PSNR {psnr(run.frames, reference):.1f} dB",
            )

    def section_attention(self, frames: int, steps: int) -> None:
        from diffusers.utils import is_flash_attn_available, is_sageattention_available

        print(f"attention: s/step at {frames} frames", flush=True)
        base = self.job(frames, steps)
        self.row(f"{frames}f attention native", f"{median_step(base.step_ends):.3f} s/step")
        for backend, present in (
            ("flash", is_flash_attn_available()),
            ("sage", is_sageattention_available()),
        ):
            if not present:
                self.row(f"{frames}f attention {backend}", "not installed")
                continue
            run = self.job(frames, steps, attention=backend)
            self.row(
                f"{frames}f attention {backend}",
                f"{median_step(run.step_ends):.3f} s/step, PSNR vs native "
                f"{psnr(run.frames, base.frames):.1f} dB"
                if run.ok
                else f"failed: {run.why}",
            )

    def section_compile(self, frames: int, steps: int) -> None:
        print(f"compile: regional compile at {frames} frames", flush=True)
        base = self.job(frames, steps)
        first = self.job(frames, steps, compile=True)
        if not first.ok:
            self.row(f"{frames}f compile", f"failed: {first.why}")
            return
        second = self.job(frames, steps, compile=True)
        self.row(
            f"{frames}f compile",
            f"first job {first.final_seconds():.1f} s (compiling), then "
            f"{median_step(second.step_ends):.3f} s/step vs {median_step(base.step_ends):.3f}",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None)
    parser.add_argument("--frames", type=int, nargs="+", default=[33, 81])
    parser.add_argument("--steps", type=int, default=6, help="steps per timed job")
    parser.add_argument("--rounds", type=int, default=2, help="daemon/plain pairs per size")
    parser.add_argument("--profile-frames", type=int, default=81)
    parser.add_argument(
        "--profiles",
        nargs="+",
        choices=PROFILES,
        default=list(PROFILES),
        help="memory profiles to measure, the first is the PSNR reference",
    )
    parser.add_argument("--cache-frames", type=int, default=33)
    parser.add_argument("--cache-steps", type=int, default=30)
    parser.add_argument("--text-encoder", choices=("full", "small"), default="full")
    parser.add_argument("--folder", type=Path, default=Path(".bench/wan21-1.3b-random"))
    parser.add_argument("--smoke", action="store_true", help="run on CPU at toy sizes")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("skipped: no CUDA")
        return 0
    sections = args.sections or ["daemon", "profiles", "caches"]
    size = {"width": 832, "height": 480}
    if args.smoke:
        size = {"width": 64, "height": 64}
        args.frames, args.profile_frames, args.cache_frames = [5], 5, 5
        args.steps, args.cache_steps, args.rounds = min(args.steps, 3), 4, 1
        args.text_encoder = "small" if not cuda else args.text_encoder
        if args.folder == parser.get_default("folder"):
            args.folder = Path(".bench/wan21-1.3b-random-smoke")
    device = "cuda" if cuda else "cpu"
    build_folder(args.folder.absolute(), args.text_encoder, device)
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
        f"text encoder {args.text_encoder}; {size['width']}x{size['height']}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="wangend-gpu-") as tmp,
        running_daemon(
            Path(tmp),
            model=str(args.folder.absolute()),
            device=device,
            dtype="bfloat16",
            max_attempts=1,
            media={"crf": 0, "pix_fmt": "yuv444p"},  # lossless enough for PSNR
        ) as (daemon, client),
    ):
        bench = Bench(daemon, client, size)
        for section in sections:
            if section == "daemon":
                bench.section_daemon(args.frames, args.steps, args.rounds)
            elif section == "profiles":
                bench.section_profiles(args.profile_frames, args.steps, args.profiles)
            elif section == "caches":
                bench.section_caches(args.cache_frames, args.cache_steps)
            elif section == "attention":
                bench.section_attention(args.profile_frames, args.steps)
            elif section == "compile":
                bench.section_compile(args.cache_frames, args.steps)
        rows = bench.rows
    width = max(len(k) for k, _ in rows) if rows else 0
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
