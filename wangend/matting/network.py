"""The MatAnyone network: module tree and the per-frame operations the engine calls.

Attribute names mirror the published checkpoints (see tests/matting/official_keys.py),
so `load_state_dict` takes an official file as it is. The network has no `forward`:
a video is processed by `engine.MattingEngine`, which calls these pieces in order:

    encode_image  -> multi-scale features (strides 16, 8, 4, 2, 1) + pixel features
    transform_key -> key, shrinkage, selection (for memory matching)
    encode_mask   -> mask value, new sensory memory, object summaries
    predict_uncertainty -> where memory readout is trusted over the last frame's value
    fuse_pixels + object_transformer -> the readout the decoder turns into an alpha
    decode        -> new sensory memory and the alpha matte
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    DecoderFeatureProcessor,
    GConv2d,
    GroupFeatureFusionBlock,
    MaskUpsampleBlock,
    SensoryDeepUpdater,
    SensoryUpdater,
)
from .config import MatAnyOneNetConfig
from .resnet import ResNetTrunk
from .transformer import ObjectSummarizer, QueryTransformer

__all__ = ["MatAnyOneNet"]


class PixelEncoder(nn.Module):
    """ResNet to layer3; the checkpoint names layer1 `res2`."""

    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        trunk = ResNetTrunk(cfg.pixel_encoder.type, cfg.pixel_encoder.base_width)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)  # fmt: skip
        self.res2, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f2 = self.relu(self.bn1(self.conv1(x)))
        f4 = self.res2(self.maxpool(f2))
        f8 = self.layer2(f4)
        return [self.layer3(f8), f8, f4, f2, x]


class KeyProjection(nn.Module):
    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        mid = cfg.pixel_dim
        self.pix_feat_proj = nn.Conv2d(cfg.pixel_encoder.ms_dims[0], mid, 1)
        self.key_proj = nn.Conv2d(mid, cfg.key_dim, 3, padding=1)
        self.d_proj = nn.Conv2d(mid, 1, 3, padding=1)  # shrinkage
        self.e_proj = nn.Conv2d(mid, cfg.key_dim, 3, padding=1)  # selection
        nn.init.orthogonal_(self.key_proj.weight)
        nn.init.zeros_(self.key_proj.bias)

    def forward(self, f16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pix_feat_proj(f16)
        return self.key_proj(x), self.d_proj(x) ** 2 + 1, torch.sigmoid(self.e_proj(x))


class MaskEncoder(nn.Module):
    """ResNet over image + mask (+ the other objects' masks when multi-object)."""

    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        extra = 1 if cfg.single_object else 2
        trunk = ResNetTrunk(cfg.mask_encoder.type, cfg.mask_encoder.base_width, 3 + extra)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)  # fmt: skip
        self.layer1, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3
        self.fuser = GroupFeatureFusionBlock(
            cfg.pixel_dim, cfg.mask_encoder.final_dim, cfg.value_dim
        )
        self.sensory_update = SensoryDeepUpdater(cfg.value_dim, cfg.sensory_dim)

    def forward(
        self,
        image: torch.Tensor,
        pix_feat: torch.Tensor,
        sensory: torch.Tensor,
        masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = masks.shape[:2]
        g = torch.cat([image.unsqueeze(1).expand(-1, n, -1, -1, -1), masks.unsqueeze(2)], dim=2)
        g = self.maxpool(self.relu(self.bn1(self.conv1(g.flatten(0, 1)))))
        g = self.layer3(self.layer2(self.layer1(g)))
        value = self.fuser(pix_feat, g.view(b, n, *g.shape[1:]))
        return value, self.sensory_update(value, sensory)


class PixelFeatureFuser(nn.Module):
    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        extra = 1 if cfg.single_object else 2
        self.fuser = GroupFeatureFusionBlock(cfg.pixel_dim, cfg.value_dim, cfg.embed_dim)
        self.sensory_compress = GConv2d(cfg.sensory_dim + extra, cfg.value_dim, 1)

    def forward(
        self,
        pix_feat: torch.Tensor,
        readout: torch.Tensor,
        sensory: torch.Tensor,
        last_mask: torch.Tensor,
    ) -> torch.Tensor:
        compressed = self.sensory_compress(torch.cat([sensory, last_mask.unsqueeze(2)], dim=2))
        return self.fuser(pix_feat, readout + compressed)


class MaskDecoder(nn.Module):
    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        up = list(cfg.mask_decoder.up_dims)
        s = cfg.sensory_dim
        self.sensory_update = SensoryUpdater([up[0], up[1], up[2], up[3], up[4] + 1], s, s)
        self.decoder_feat_proc = DecoderFeatureProcessor(
            list(cfg.pixel_encoder.ms_dims[1:]), up[:-1]
        )
        self.up_16_8 = MaskUpsampleBlock(up[0], up[1])
        self.up_8_4 = MaskUpsampleBlock(up[1], up[2])
        self.up_4_2 = MaskUpsampleBlock(up[2], up[3])
        self.up_2_1 = MaskUpsampleBlock(up[3], up[4])
        self.pred_seg = nn.Conv2d(up[-1], 1, 3, padding=1)  # segmentation head (training)
        self.pred_mat = nn.Conv2d(up[-1], 1, 3, padding=1)  # matting head

    def forward(
        self, feats: list[torch.Tensor], readout: torch.Tensor, sensory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = readout.shape[:2]
        f8, f4, f2, f1 = self.decoder_feat_proc(feats[1:])
        p8 = self.up_16_8(readout, f8)
        p4 = self.up_8_4(p8, f4)
        p2 = self.up_4_2(p4, f2)
        p1 = self.up_2_1(p2, f1)
        raw = self.pred_mat(F.relu(p1.flatten(0, 1).float())).view(b, n, 1, *p1.shape[-2:])
        new_sensory = self.sensory_update([readout, p8, p4, p2, torch.cat([p1, raw], 2)], sensory)
        return new_sensory, raw.squeeze(2)


class UncertaintyHead(nn.Module):
    """Predicts, per stride-16 pixel, how far the memory readout can be trusted against
    simply carrying the last frame's value forward (MatAnyone's consistent memory)."""

    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        in_dim = cfg.pixel_dim * 2 + 1 + cfg.value_dim
        self.conv1x1_v2 = nn.Conv2d(in_dim, 64, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv3x3 = nn.Conv2d(64, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3x3_out = nn.Conv2d(32, 1, 3, padding=1, bias=False)

    def forward(
        self,
        last_feat: torch.Tensor,
        feat: torch.Tensor,
        last_mask: torch.Tensor,
        diff: torch.Tensor,
    ) -> torch.Tensor:
        last_mask = F.interpolate(last_mask, size=feat.shape[-2:], mode="area")
        x = torch.cat([last_feat, feat, last_mask, diff], dim=1)
        x = F.relu(self.bn1(self.conv1x1_v2(x)))
        x = F.relu(self.bn2(self.conv3x3(x)))
        return self.conv3x3_out(x)


class _SensoryAux(nn.Module):
    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        self.projection = GConv2d(cfg.sensory_dim, cfg.embed_dim + 1, 1)


class AuxComputer(nn.Module):
    """Training-time auxiliary predictor. It never runs here, but its weights are in the
    checkpoints, so it exists to keep the key set whole."""

    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        self.sensory_aux: nn.Module | None = _SensoryAux(cfg) if cfg.aux_sensory else None


class MatAnyOneNet(nn.Module):
    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.pixel_encoder = PixelEncoder(cfg)
        self.pix_feat_proj = nn.Conv2d(cfg.pixel_encoder.ms_dims[0], cfg.pixel_dim, 1)
        self.key_proj = KeyProjection(cfg)
        self.mask_encoder = MaskEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.pixel_fuser = PixelFeatureFuser(cfg)
        self.object_transformer = QueryTransformer(cfg)
        self.object_summarizer = ObjectSummarizer(cfg)
        self.aux_computer = AuxComputer(cfg)
        self.temp_sparity = UncertaintyHead(cfg)  # the checkpoint's name for it
        mean = torch.tensor(cfg.pixel_mean).view(-1, 1, 1)
        std = torch.tensor(cfg.pixel_std).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.pixel_mean) / self.pixel_std

    def encode_image(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """image: (B, 3, H, W) in [0, 1], H and W multiples of 16."""
        feats = self.pixel_encoder(self.normalise(image))
        return feats, self.pix_feat_proj(feats[0])

    def transform_key(self, f16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.key_proj(f16)

    def encode_mask(
        self,
        image: torch.Tensor,
        pix_feat: torch.Tensor,
        sensory: torch.Tensor,
        masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """masks: (B, N, H, W) -> value (B, N, V, h, w), sensory, summaries (B, N, Q, E+1)."""
        value, sensory = self.mask_encoder(self.normalise(image), pix_feat, sensory, masks)
        return value, sensory, self.object_summarizer(masks, value)

    def predict_uncertainty(
        self,
        last_feat: torch.Tensor,
        feat: torch.Tensor,
        last_mask: torch.Tensor,
        diff: torch.Tensor,
    ) -> torch.Tensor:
        """Probability (B, 1, h, w) that the memory readout should be used."""
        return torch.sigmoid(self.temp_sparity(last_feat, feat, last_mask, diff))

    def read_out(
        self,
        pix_feat: torch.Tensor,
        readout: torch.Tensor,
        sensory: torch.Tensor,
        last_mask: torch.Tensor,
        summaries: torch.Tensor,
    ) -> torch.Tensor:
        """Fuse the visual readout with sensory memory, then refine with the queries."""
        small = F.interpolate(last_mask, size=sensory.shape[-2:], mode="area")
        fused = self.pixel_fuser(pix_feat, readout, sensory, small)
        return self.object_transformer(fused, summaries)

    def decode(
        self, feats: list[torch.Tensor], readout: torch.Tensor, sensory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> new sensory, alpha (B, N, H, W) clamped to [0, 1]."""
        sensory, raw = self.mask_decoder(feats, readout, sensory)
        return sensory, raw.clamp(0.0, 1.0)
