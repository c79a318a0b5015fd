"""Weights that still map their file, and copying them out.

safetensors loads by mapping the file: a tensor whose dtype needs no cast is the file's
pages, not a copy. On a GPU with memory profile "none" that lasts only until the model
moves to the device. Where the weights stay in host memory (a CPU device, the offload
profiles) the warm model keeps reading the file for as long as it lives, so a file the
user rewrites in place changes the model under a running job, and one that becomes
shorter (`cp` of a smaller file over it, `truncate`) kills the daemon with SIGBUS on the
next page it touches. Copying the mapped tensors out once, after the load, ends both.

Which tensors map a file is read from /proc/self/maps: a tensor whose data lies in a
file-backed mapping. Elsewhere (no /proc), every host tensor is copied: slower, and safe.

A copy keeps its address's offset within 64 bytes. CPU kernels take other code paths for
differently aligned data, and the results differ in the last bit (measured on the tiny
model: 1.2e-7 in the frames, enough to flip a pixel's value). With the offset kept, the
copied model computes exactly what the mapped one did, and so what diffusers' own load
computes: the frames a job makes stay those of a direct diffusers call.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["copy_mapped_tensors", "file_mappings"]

# Mappings that are devices or anonymous memory under a name, never a user's file.
_NOT_FILES = ("/dev/", "/memfd:", "/SYSV")
ALIGN = 64  # the widest vector loads (AVX-512) and a cache line


def file_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]] | None:
    """Sorted (start, end) address ranges of this process's mappings of regular files,
    or None when the maps cannot be read (not Linux)."""
    try:
        text = maps.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith(_NOT_FILES):
            continue
        start, end = fields[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    ranges.sort()
    return ranges


def copy_mapped_tensors(modules: Iterable[Any]) -> int:
    """Give every host tensor of `modules` that maps a file memory of its own, in place
    (a parameter stays the same Parameter object, so tied weights stay tied). Returns
    how many tensors were copied."""
    ranges = file_mappings()
    starts = [start for start, _end in ranges] if ranges is not None else []

    def mapped(tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        if ranges is None:
            return True
        address = tensor.untyped_storage().data_ptr()
        index = bisect.bisect_right(starts, address) - 1
        return index >= 0 and address < ranges[index][1]

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        raw = torch.empty(size + ALIGN, dtype=torch.uint8)
        shift = (tensor.data_ptr() - raw.data_ptr()) % ALIGN
        if not tensor.is_contiguous() or shift % tensor.element_size():
            return tensor.clone()
        out = raw[shift : shift + size].view(tensor.dtype).view(tensor.shape)
        return out.copy_(tensor)

    copied = 0
    for root in modules:
        if not isinstance(root, torch.nn.Module):
            continue
        for module in root.modules():
            for param in module._parameters.values():
                if param is not None and mapped(param.data):
                    param.data = copy(param.data)
                    copied += 1
            for name, buffer in module._buffers.items():
                if buffer is not None and mapped(buffer):
                    module._buffers[name] = copy(buffer)
                    copied += 1
    return copied
