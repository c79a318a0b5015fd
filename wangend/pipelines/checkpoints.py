"""Single-file Wan transformer checkpoints: the `.safetensors` files ComfyUI
(`models/diffusion_models/`) and Wan2GP (`ckpts/`) keep, used in place of a diffusers
folder's `transformer/` (or `transformer_2/`) so nobody downloads 28 GB they already have.

A `[models.NAME]` table (config.ModelFiles) names the file(s) and a `base` model; the
base supplies every other part and the transformer's config. Files come in two layouts,
both read here: the original Wan one (`blocks.0.self_attn.q.weight`, optionally under
`model.diffusion_model.`) that diffusers' own single-file converter renames, and the
diffusers one (`blocks.0.attn1.to_q.weight`, a diffusers transformer saved as one file).

`inspect_transformer` reads only the safetensors header, so it runs at enqueue: a file
that is not a Wan transformer, a quantized one wangend cannot load (optimum-quanto int8
as Wan2GP ships, ComfyUI's "fp8_scaled"), or one whose shape does not fit the base
(a 14B file on a 1.3B base) is refused then, naming what it found and what the base
expects. Plain fp8 files (e4m3fn, no scales) load, upcast to the job's dtype.

`load_transformer` builds the model from the base's config with empty weights and
assigns the file's tensors (copies where the model stays on the host, so rewriting the
file cannot change it), cast the way diffusers' from_pretrained casts a folder's:
the job's dtype, except the modules the class keeps in float32 (norms, the time
embedder, the modulation tables). diffusers' `from_single_file` casts those too in
bf16, and loads into float32 when given no dtype (56 GB for a 14B model), hence our own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .weights import PICKLED, read_header, short_of

__all__ = [
    "CheckpointProblem",
    "TransformerFile",
    "check_file",
    "check_fits",
    "inspect_transformer",
    "load_transformer",
]

PREFIX = "model.diffusion_model."  # ComfyUI's files put the transformer under this
BLOCK = re.compile(r"blocks\.(\d+)\.")
VACE_BLOCK = re.compile(r"vace_blocks\.(\d+)\.")


class CheckpointProblem(ValueError):
    """A checkpoint file wangend cannot use; the message says why, naming the file."""


@dataclass(frozen=True)
class TransformerFile:
    """What a Wan transformer file's header says about it."""

    path: Path
    size: int
    width: int  # the hidden size: heads x head dim (1536 for 1.3B, 5120 for 14B)
    in_channels: int  # 16 text-to-video, 36 image-to-video, 48 Wan 2.2 TI2V
    blocks: int
    vace_blocks: int
    image_embedding: bool  # a CLIP image embedder (Wan 2.1 I2V and FLF2V)
    diffusers_layout: bool
    dtypes: tuple[str, ...]

    def describe(self) -> str:
        parts = [
            f"width {self.width}",
            f"{self.blocks} blocks",
            f"{self.in_channels} input channels",
        ]
        if self.vace_blocks:
            parts.append(f"{self.vace_blocks} VACE blocks")
        if self.image_embedding:
            parts.append("an image embedder")
        return ", ".join(parts)


def _refuse(path: Path, why: str) -> CheckpointProblem:
    return CheckpointProblem(f"transformer file {path}: {why}")


def inspect_transformer(path: Path) -> TransformerFile:
    """The facts of a Wan transformer file, from its header; CheckpointProblem when it is
    missing, unreadable, cut short, not safetensors, quantized, or not a Wan
    transformer."""
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        raise _refuse(path, "GGUF files are not supported; use a bf16, fp16 or fp8 .safetensors")
    if suffix in PICKLED:
        raise _refuse(
            path,
            "pickled weights run code when loaded; wangend loads .safetensors only (use the "
            "model's .safetensors file, or convert this one)",
        )
    try:
        if not path.is_file():
            raise _refuse(path, "no such file" if not path.exists() else "not a file")
        header, start, size = read_header(path)
        short = short_of(header, start, size)
    except OSError as exc:  # a folder the daemon's user cannot enter, a name too long
        raise _refuse(path, f"unreadable ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise _refuse(path, str(exc)) from None
    if short:
        raise _refuse(path, short)
    try:
        return _facts(path, header, size)
    except (TypeError, ValueError, AttributeError) as exc:  # a header of the wrong shapes
        raise _refuse(path, f"its header does not describe tensors ({exc})") from None


def _facts(path: Path, header: dict, size: int) -> TransformerFile:
    metadata = header.get("__metadata__")
    entries = {
        k.removeprefix(PREFIX): v
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, Mapping)
    }
    _refuse_quantized(path, entries, metadata if isinstance(metadata, Mapping) else {})
    patch = entries.get("patch_embedding.weight")
    shape = patch.get("shape") if patch else None
    if not (isinstance(shape, list) and len(shape) == 5):
        raise _refuse(path, f"not a Wan transformer (no patch_embedding.weight); {_guess(entries)}")
    blocks = {int(m.group(1)) for k in entries if (m := BLOCK.match(k))}
    vace = {int(m.group(1)) for k in entries if (m := VACE_BLOCK.match(k))}
    diffusers_layout = any(k.startswith("condition_embedder.") for k in entries)
    image = any(k.startswith(("img_emb.", "condition_embedder.image_embedder.")) for k in entries)
    return TransformerFile(
        path=path,
        size=size,
        width=int(shape[0]),
        in_channels=int(shape[1]),
        blocks=len(blocks),
        vace_blocks=len(vace),
        image_embedding=image,
        diffusers_layout=diffusers_layout,
        dtypes=tuple(sorted({str(v.get("dtype")) for v in entries.values()})),
    )


def _refuse_quantized(path: Path, entries: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Quantized files keep scales beside the weights; loading them as plain tensors
    would make noise, so they are refused by name."""
    if any(k.endswith(("._data", "._scale", ".input_scale", ".output_scale")) for k in entries):
        raise _refuse(
            path,
            "quantized with optimum-quanto (Wan2GP's *_quanto_* files), which wangend cannot "
            "load; use the bf16 or fp16 file of the same model",
        )
    if "scaled_fp8" in entries or any(
        k.endswith((".scale_weight", ".scale_input")) for k in entries
    ):
        raise _refuse(
            path,
            "scaled fp8 (ComfyUI's *_fp8_scaled files), which wangend cannot load; use a "
            "bf16, fp16 or plain fp8_e4m3fn file of the same model",
        )
    if any(str(v.get("dtype")) in ("I8", "U8", "I4", "U4") for v in entries.values()):
        raise _refuse(path, "integer-quantized weights, which wangend cannot load")
    if metadata.get("quantization") or metadata.get("quantization_config"):
        raise _refuse(path, "a quantized checkpoint, which wangend cannot load")


def _guess(entries: Mapping[str, Any]) -> str:
    """What the file looks like instead, so a mixed-up path is easy to fix."""
    keys = list(entries)
    if any(k.startswith(("decoder.", "encoder.conv1", "encoder.downsamples")) for k in keys):
        return "it looks like a VAE"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "it looks like a text encoder"
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in keys):
        return "it looks like a LoRA (those go in the LoRA folders)"
    return f"its {len(keys)} tensors do not name one"


def check_file(path: Path, config: Mapping[str, Any] | None, base: str) -> TransformerFile:
    """`inspect_transformer`, then `check_fits` against the base's transformer config
    when it is at hand (a hub base's is not before its download): what a file must pass
    when its job is queued, and again before it loads."""
    found = inspect_transformer(path)
    if config is not None:
        check_fits(found, config, base)
    return found


def check_fits(found: TransformerFile, config: Mapping[str, Any], base: str) -> None:
    """CheckpointProblem when the file's shape is not the one the base's transformer
    config describes: a 14B file on a 1.3B base, an I2V file on a T2V base, ..."""
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    width = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
    vace = config.get("vace_layers")
    expected = TransformerFile(
        path=Path(base),
        size=0,
        width=width if width is not None else found.width,
        in_channels=config.get("in_channels", found.in_channels),
        blocks=config.get("num_layers", found.blocks),
        vace_blocks=len(vace) if isinstance(vace, list) else 0,
        image_embedding=config.get("image_dim") is not None,
        diffusers_layout=found.diffusers_layout,
        dtypes=found.dtypes,
    )
    if expected.describe() != found.describe():
        raise _refuse(
            found.path,
            f"a Wan transformer with {found.describe()}, but base {base} expects "
            f"{expected.describe()}; pick the base of the same model size and task",
        )


def load_transformer(cls: Any, path: Path, config_folder: Path, dtype: Any) -> Any:
    """A `cls` transformer (WanTransformer3DModel, WanVACETransformer3DModel) configured
    from `config_folder/config.json`, holding the tensors of the single file `path` in
    `dtype` (float32 for the modules the class keeps so). The caller has inspected the
    file (`check_file`); tensors it lacks or does not know are
    refused here.

    Tensors whose dtype needs no cast still map the file, as a folder's do after
    from_pretrained: where the weights stay on the host, the loader copies every
    mapped tensor out afterwards, the same way for both (mappings.py)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open

    with init_empty_weights():
        model = cls.from_config(cls.load_config(config_folder))
    wanted = model.state_dict().keys()
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            tensors[key.removeprefix(PREFIX)] = handle.get_tensor(key)
    diffusers_layout = any(key.startswith("condition_embedder.") for key in tensors)
    if not diffusers_layout and not tensors.keys() <= wanted:  # the original Wan names
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        tensors = convert_wan_transformer_to_diffusers(tensors)
    missing = sorted(wanted - tensors.keys())
    unexpected = sorted(tensors.keys() - wanted)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"lacks {len(missing)} tensors the model needs ({missing[0]}, ...)")
        if unexpected:
            detail.append(f"has {len(unexpected)} it does not know ({unexpected[0]}, ...)")
        raise _refuse(path, "; ".join(detail))
    keep = cls._keep_in_fp32_modules or []
    for key in list(tensors):
        value = tensors.pop(key)
        target = value.dtype
        if value.is_floating_point():
            kept = any(name in key.split(".") for name in keep)
            target = torch.float32 if kept else dtype
        tensors[key] = value.to(target)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
