"""Single-file transformer checkpoints as ComfyUI and Wan2GP users have them, written from
a tiny diffusers folder: the original Wan layout (`blocks.0.self_attn.q.weight`,
optionally under `model.diffusion_model.`) or the diffusers one, in any dtype.

The original names are the inverse of the renaming diffusers' single-file converter
applies; a file written here only loads if that converter maps every name back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# diffusers name piece -> original Wan name piece, applied in this order.
_TO_WAN = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__swap"),
    ("norm3", "norm2"),
    ("norm__swap", "norm3"),
)


def wan_name(key: str) -> str:
    """The original Wan checkpoint's name for a diffusers transformer tensor."""
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key.removeprefix("proj_out.")
    if key.startswith("vace_blocks."):
        key = key.replace(".proj_in.", ".before_proj.").replace(".proj_out.", ".after_proj.")
    for diffusers_part, wan_part in _TO_WAN:
        key = key.replace(diffusers_part, wan_part)
    return key.replace("scale_shift_table", "modulation")


def write_checkpoint(
    component: Path,
    target: Path,
    *,
    layout: str = "wan",
    prefix: str = "",
    dtype: torch.dtype | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the weights of a diffusers component folder (`.../transformer`) as one
    .safetensors file in `layout` "wan" or "diffusers", names under `prefix`, tensors
    cast to `dtype` when given, `extra` tensors added."""
    tensors = load_file(str(component / "diffusion_pytorch_model.safetensors"))
    out = {}
    for key, value in tensors.items():
        name = wan_name(key) if layout == "wan" else key
        out[prefix + name] = (value.to(dtype) if dtype is not None else value).contiguous()
    out.update(extra or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target))
    return target
