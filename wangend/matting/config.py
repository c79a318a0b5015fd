"""Sizes of the MatAnyone network and of its memory, as one frozen struct.

The field names follow the published model configuration (`model.pixel_dim`,
`model.object_transformer.num_blocks`, `mem_every`, `top_k`, ...) so that a config.json
shipped beside a re-packed checkpoint reads straight into `MatAnyOneNetConfig`. Two
fields are ours: `base_width` of each ResNet (64 in the published network), which lets
the built-in tiny network keep every module and key of the real one at a fraction of
the size, and `single_object`, which fixes the mask encoder's input channels (the
released network runs with one object: RGB + mask).
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "OFFICIAL",
    "TINY",
    "MaskDecoderConfig",
    "MaskEncoderConfig",
    "MatAnyOneNetConfig",
    "MemoryConfig",
    "ObjectSummarizerConfig",
    "ObjectTransformerConfig",
    "PixelEncoderConfig",
]

ResNetType = Literal["resnet18", "resnet50"]


class PixelEncoderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    type: ResNetType = "resnet50"
    # channels at strides 16, 8, 4, 2, 1 (the last is the RGB input itself)
    ms_dims: tuple[int, ...] = (1024, 512, 256, 64, 3)
    base_width: int = 64


class MaskEncoderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    type: ResNetType = "resnet18"
    final_dim: int = 256  # channels out of layer3
    base_width: int = 64


class ObjectTransformerConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False
):
    embed_dim: int = 256
    ff_dim: int = 2048
    num_heads: int = 8
    num_blocks: int = 3
    num_queries: int = 16


class ObjectSummarizerConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False
):
    embed_dim: int = 256
    num_summaries: int = 16
    add_pe: bool = True


class MaskDecoderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    up_dims: tuple[int, ...] = (256, 128, 128, 64, 16)  # strides 16, 8, 4, 2, 1


class MemoryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """How the run keeps memory: a frame is remembered every `mem_every` frames, at most
    `max_mem_frames` are kept (the first frame always), and each query pixel reads its
    `top_k` best matches (fewer when the memory holds fewer tokens)."""

    mem_every: int = 5
    max_mem_frames: int = 5
    top_k: int = 30


class MatAnyOneNetConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pixel_dim: int = 256
    key_dim: int = 64
    value_dim: int = 256
    sensory_dim: int = 256
    embed_dim: int = 256
    pixel_pe_scale: int = 32
    pixel_pe_temperature: int = 128
    single_object: bool = True
    aux_sensory: bool = True  # the training-time sensory predictor is part of the checkpoint
    pixel_encoder: PixelEncoderConfig = PixelEncoderConfig()
    mask_encoder: MaskEncoderConfig = MaskEncoderConfig()
    object_transformer: ObjectTransformerConfig = ObjectTransformerConfig()
    object_summarizer: ObjectSummarizerConfig = ObjectSummarizerConfig()
    mask_decoder: MaskDecoderConfig = MaskDecoderConfig()
    memory: MemoryConfig = MemoryConfig()

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent size (the modules assume them)."""
        pe = self.pixel_encoder
        w = pe.base_width
        # a bottleneck ResNet widens each stage 4x; a basic-block one does not
        x = 4 if pe.type == "resnet50" else 1
        expected = (4 * w * x, 2 * w * x, w * x, w, 3)
        if tuple(pe.ms_dims) != expected:
            raise ValueError(f"pixel_encoder.ms_dims must be {expected} for {pe.type} width {w}")
        me = self.mask_encoder
        me_out = 4 * me.base_width * (4 if me.type == "resnet50" else 1)
        if me.final_dim != me_out:
            raise ValueError(f"mask_encoder.final_dim must be {me_out}")
        if self.mask_decoder.up_dims[0] != self.embed_dim:
            raise ValueError("mask_decoder.up_dims[0] must equal embed_dim")
        if len(self.mask_decoder.up_dims) != 5:
            raise ValueError("mask_decoder.up_dims must have 5 entries (strides 16..1)")
        ot, os_ = self.object_transformer, self.object_summarizer
        if ot.embed_dim != self.embed_dim or os_.embed_dim != self.embed_dim:
            raise ValueError("object_transformer/summarizer embed_dim must equal embed_dim")
        if ot.embed_dim % ot.num_heads:
            raise ValueError("object_transformer.embed_dim must be divisible by num_heads")
        if ot.num_queries != os_.num_summaries or ot.num_queries % 2:
            raise ValueError("num_queries must equal num_summaries and be even")
        m = self.memory
        if m.mem_every < 1 or m.max_mem_frames < 1 or m.top_k < 1:
            raise ValueError("memory.mem_every, max_mem_frames and top_k must be >= 1")


OFFICIAL = MatAnyOneNetConfig()

# The same modules and keys with small numbers: fast on a CPU, for tests and demos.
TINY = MatAnyOneNetConfig(
    pixel_dim=16,
    key_dim=8,
    value_dim=16,
    sensory_dim=8,
    embed_dim=16,
    pixel_encoder=PixelEncoderConfig(ms_dims=(64, 32, 16, 4, 3), base_width=4),
    mask_encoder=MaskEncoderConfig(final_dim=16, base_width=4),
    object_transformer=ObjectTransformerConfig(
        embed_dim=16, ff_dim=32, num_heads=2, num_blocks=3, num_queries=4
    ),
    object_summarizer=ObjectSummarizerConfig(embed_dim=16, num_summaries=4),
    mask_decoder=MaskDecoderConfig(up_dims=(16, 8, 8, 4, 2)),
)
