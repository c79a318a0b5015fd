"""Tiny LoRA files for the tiny Wan transformer (inner dim 24, FFN 32, 2 blocks), in the
three key layouts found in the wild: diffusers/peft, original Wan (`diffusion_model.`)
and musubi/kohya (`lora_unet_` with `.alpha`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DIM, FFN, BLOCKS, RANK = 24, 32, 2, 4


def _pair(gen: torch.Generator, fan_in: int, fan_out: int, scale: float) -> tuple:
    down = torch.randn(RANK, fan_in, generator=gen) * scale
    up = torch.randn(fan_out, RANK, generator=gen) * scale
    return down, up


def lora_tensors(layout: str, seed: int, scale: float = 0.5, dim: int = DIM) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(BLOCKS):
        attn = [
            ("self_attn", "attn1", o, c)
            for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)
        ]
        attn += [
            ("cross_attn", "attn2", o, c)
            for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)
        ]
        for orig, ours, o, c in attn:
            down, up = _pair(gen, dim, dim, scale)
            if layout == "diffusers":
                out[f"transformer.blocks.{i}.{ours}.{c}.lora_A.weight"] = down
                out[f"transformer.blocks.{i}.{ours}.{c}.lora_B.weight"] = up
            elif layout == "wan":
                out[f"diffusion_model.blocks.{i}.{orig}.{o}.lora_A.weight"] = down
                out[f"diffusion_model.blocks.{i}.{orig}.{o}.lora_B.weight"] = up
            else:
                base = f"lora_unet_blocks_{i}_{orig}_{o}"
                out[f"{base}.lora_down.weight"] = down
                out[f"{base}.lora_up.weight"] = up
                out[f"{base}.alpha"] = torch.tensor(float(RANK))
        if layout == "diffusers":
            continue  # attention only: two LoRAs then cover different module sets
        for orig, fan_in, fan_out in (("ffn_0", dim, FFN), ("ffn_2", FFN, dim)):
            down, up = _pair(gen, fan_in, fan_out, scale)
            if layout == "wan":
                name = orig.replace("_", ".")
                out[f"diffusion_model.blocks.{i}.{name}.lora_A.weight"] = down
                out[f"diffusion_model.blocks.{i}.{name}.lora_B.weight"] = up
            else:
                base = f"lora_unet_blocks_{i}_{orig}"
                out[f"{base}.lora_down.weight"] = down
                out[f"{base}.lora_up.weight"] = up
                out[f"{base}.alpha"] = torch.tensor(float(RANK))
    return out


def write_lora(path: Path, layout: str, seed: int, **kwargs) -> Path:
    save_file(
        {k: v.contiguous() for k, v in lora_tensors(layout, seed, **kwargs).items()}, str(path)
    )
    return path
