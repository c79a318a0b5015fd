"""What a single-file transformer checkpoint costs against a diffusers folder.

The Wan 2.1 1.3B transformer architecture with random weights in bf16 (real size: 30
blocks of width 1536, 2.8 GB), saved as a diffusers folder and as one file in the
original Wan layout under ComfyUI's `model.diffusion_model.` prefix, then loaded in
bf16 three ways, each in a fresh process (so page cache is warm for all and peak RSS is
the load's own); the time includes reading every parameter once, since safetensors
maps a file and reads it lazily:

* folder: `WanTransformer3DModel.from_pretrained(folder, torch_dtype=bf16)`, what a
  plain model does, and "folder-copy": then `mappings.copy_mapped_tensors`, what
  wangend adds on a CPU device or an offload profile (no tensor left mapping its file);
* wangend: `checkpoints.load_transformer` (renaming, the from_pretrained dtype rule),
  as on a GPU with memory profile "none" (the model leaves the file's memory map when it
  moves to the device), and "wangend-copy", as on a CPU device or an offload profile
  (every still-mapped tensor copied out, so rewriting the file cannot touch the model);
* from_single_file: diffusers' own loader, for reference (it casts the float32-kept
  modules to bf16 too, so its result differs).

Also the enqueue-time cost: `inspect_transformer` on the 1.3B file, and on a 14B-shaped
file (40 blocks of width 5120, 28 GB promised, written sparse so it takes no disk).

Prints figures; asserts nothing. Run: `.venv/bin/python bench/checkpoint_load.py`
(first run writes ~5.6 GB under .bench/).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

FOLDER = Path(".bench/wan21-1.3b-transformer")
FILE = Path(".bench/wan2.1_t2v_1.3B_random_bf16.safetensors")
CONFIG = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip


def prepare() -> None:
    """The random 1.3B transformer as a folder and as an original-layout file."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.pipelines.checkpoint_files import wan_name

    if FOLDER.is_dir() and FILE.is_file():
        return
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG).to(torch.bfloat16)
    model.save_pretrained(FOLDER, safe_serialization=True)
    state = {
        f"model.diffusion_model.{wan_name(k)}": v.contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(FILE))


def load(way: str) -> dict[str, float]:
    """One load in this process: seconds and peak RSS in GB."""
    import torch
    from diffusers import WanTransformer3DModel

    from wangend.pipelines.checkpoints import load_transformer
    from wangend.pipelines.mappings import copy_mapped_tensors

    started = time.perf_counter()
    if way in ("folder", "folder-copy"):
        model = WanTransformer3DModel.from_pretrained(FOLDER, torch_dtype=torch.bfloat16)
        if way == "folder-copy":
            copy_mapped_tensors([model])
    elif way in ("wangend", "wangend-copy"):
        model = load_transformer(WanTransformer3DModel, FILE, FOLDER, torch.bfloat16)
        if way == "wangend-copy":  # what a CPU device or an offload profile loads
            copy_mapped_tensors([model])
    else:
        model = WanTransformer3DModel.from_single_file(
            str(FILE), config=str(FOLDER), local_files_only=True, torch_dtype=torch.bfloat16
        )
    with torch.no_grad():  # read every byte: safetensors maps files lazily
        for param in model.parameters():
            param.float().sum()
    seconds = time.perf_counter() - started
    fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    return {"seconds": seconds, "peak_gb": peak, "fp32_params": fp32}


def sparse_14b(path: Path) -> Path:
    """A file whose header describes a 14B Wan T2V transformer (bf16) and whose data is
    a hole: the header is real, the 28 GB are not on disk."""
    header: dict[str, dict] = {}
    offset = 0

    def add(name: str, *shape: int) -> None:
        nonlocal offset
        size = 2
        for n in shape:
            size *= n
        header[f"model.diffusion_model.{name}"] = {
            "dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size],
        }  # fmt: skip
        offset += size

    dim, ffn = 5120, 13824
    add("patch_embedding.weight", dim, 16, 1, 2, 2)
    add("patch_embedding.bias", dim)
    for i in range(40):
        for part in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                add(f"blocks.{i}.{part}.{proj}.weight", dim, dim)
                add(f"blocks.{i}.{part}.{proj}.bias", dim)
        add(f"blocks.{i}.ffn.0.weight", ffn, dim)
        add(f"blocks.{i}.ffn.2.weight", dim, ffn)
        add(f"blocks.{i}.modulation", 1, 6, dim)
    raw = json.dumps(header).encode()
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    ways = ("folder", "folder-copy", "wangend", "wangend-copy", "from_single_file")
    parser.add_argument("--one", choices=ways)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(load(args.one)))
        return
    from wangend.pipelines.checkpoints import inspect_transformer
    from wangend.pipelines.weights import cut_short

    prepare()
    print(f"1.3B random transformer, bf16: {FILE.stat().st_size / 1e9:.2f} GB file")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # interleaved, each in a fresh process
        for way in ways:
            out = subprocess.run(
                [sys.executable, __file__, "--one", way], capture_output=True, text=True, check=True
            )
            results.setdefault(way, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["seconds"] for r in results["folder"])
    for way, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak_gb"] for r in runs)
        print(
            f"  {way:<17} load {seconds:6.2f} s (x{seconds / base:.2f} of the folder), "
            f"peak RSS {peak:5.2f} GB, float32 params {runs[0]['fp32_params']:,}"
        )
    times = []
    for _ in range(20):
        started = time.perf_counter()
        inspect_transformer(FILE)
        times.append(time.perf_counter() - started)
    print(f"inspect_transformer, 1.3B file: {statistics.median(times) * 1e3:.2f} ms")
    big = sparse_14b(Path(".bench/wan2.1_t2v_14B_header_only.safetensors"))
    times = []
    for _ in range(20):
        started = time.perf_counter()
        found = inspect_transformer(big)
        cut_short(big)
        times.append(time.perf_counter() - started)
    print(
        f"inspect_transformer + cut_short, 14B-shaped file ({big.stat().st_size / 1e9:.1f} GB "
        f"promised, {found.describe()}): {statistics.median(times) * 1e3:.2f} ms"
    )
    big.unlink()


if __name__ == "__main__":
    main()
