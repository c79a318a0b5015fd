"""The object transformer (queries that read pixels and write back) and the object
summarizer (per-object summaries that initialise those queries).

The queries come in two halves: the first attends only to foreground pixels and the
second only to background, per the current coarse mask, which is re-predicted after
every block. Summaries are running sums (the last channel is the area), so averaging
over remembered frames is one division here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import CAResBlock, GConv2d, PositionalEncoding
from .config import MatAnyOneNetConfig

__all__ = ["ObjectSummarizer", "QueryTransformer"]


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, norm: bool = True) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm: nn.Module = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        mem: torch.Tensor,
        x_pe: torch.Tensor,
        mem_pe: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # positional encodings go to queries and keys, never to values
        x = self.norm(x)
        out = self.cross_attn(x + x_pe, mem + mem_pe, mem, attn_mask=attn_mask, need_weights=False)
        return x + out[0]


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x + self.self_attn(x + pe, x + pe, x, need_weights=False)[0]


class _FFN(nn.Module):
    def __init__(self, dim: int, ff_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(F.relu(self.linear1(self.norm(x))))


class _PixelFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = CAResBlock(dim, dim)

    def forward(self, shape: torch.Size, flat: torch.Tensor) -> torch.Tensor:
        b, n, c, h, w = shape
        grid = flat.view(b * n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return self.conv(grid).view(b, n, c, h, w)


class _Block(nn.Module):
    """Queries read pixels, talk among themselves, then pixels read the queries."""

    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        ot = cfg.object_transformer
        self.read_from_pixel = _CrossAttention(ot.embed_dim, ot.num_heads)
        self.self_attn = _SelfAttention(ot.embed_dim, ot.num_heads)
        self.ffn = _FFN(ot.embed_dim, ot.ff_dim)
        self.read_from_query = _CrossAttention(ot.embed_dim, ot.num_heads, norm=False)
        self.pixel_ffn = _PixelFFN(ot.embed_dim)

    def forward(
        self,
        q: torch.Tensor,
        pixel: torch.Tensor,
        q_pe: torch.Tensor,
        pixel_pe: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = pixel.flatten(3, 4).flatten(0, 1).transpose(1, 2).contiguous()
        q = self.read_from_pixel(q, flat, q_pe, pixel_pe, attn_mask)
        q = self.ffn(self.self_attn(q, q_pe))
        flat = self.read_from_query(flat, q, pixel_pe, q_pe)
        return q, self.pixel_ffn(pixel.shape, flat)


class QueryTransformer(nn.Module):
    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        ot = cfg.object_transformer
        e = ot.embed_dim
        self.embed_dim, self.num_heads, self.num_queries = e, ot.num_heads, ot.num_queries
        self.query_init = nn.Embedding(ot.num_queries, e)
        self.query_emb = nn.Embedding(ot.num_queries, e)
        self.summary_to_query_init = nn.Linear(e, e)
        self.summary_to_query_emb = nn.Linear(e, e)
        self.pixel_init_proj = GConv2d(e, e, 1)
        self.pixel_emb_proj = GConv2d(e, e, 1)
        self.spatial_pe = PositionalEncoding(
            e, cfg.pixel_pe_scale, cfg.pixel_pe_temperature, channel_last=True
        )
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(ot.num_blocks))
        self.mask_pred = nn.ModuleList(
            nn.Sequential(nn.ReLU(), GConv2d(e, 1, 1)) for _ in range(ot.num_blocks + 1)
        )

    def forward(self, pixel: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """pixel: (B, N, E, h, w); summaries: (B, N, Q, E+1) running sums -> (B, N, E, h, w)."""
        b, n, _, h, w = pixel.shape
        values = summaries[..., :-1] / (summaries[..., -1:] + 1e-4)
        values = values.reshape(b * n, self.num_queries, self.embed_dim)
        q = self.query_init.weight.unsqueeze(0) + self.summary_to_query_init(values)
        q_pe = self.query_emb.weight.unsqueeze(0) + self.summary_to_query_emb(values)

        emb = self.pixel_emb_proj(pixel).flatten(3, 4).flatten(0, 1).transpose(1, 2)
        grid_pe = self.spatial_pe(h, w, pixel.device, pixel.dtype).flatten(0, 1)
        pixel_pe = grid_pe.unsqueeze(0) + emb
        pixel = self.pixel_init_proj(pixel)

        attn_mask = self._attention_mask(self.mask_pred[0](pixel).squeeze(2))
        for i, block in enumerate(self.blocks):
            q, pixel = block(q, pixel, q_pe, pixel_pe, attn_mask)
            attn_mask = self._attention_mask(self.mask_pred[i + 1](pixel).squeeze(2))
        return pixel

    def _attention_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(B*N*heads, Q, h*w), True = blocked: foreground queries see only pixels the
        coarse mask calls foreground, background queries the rest. A query that would
        see nothing sees everything instead (softmax over nothing is undefined)."""
        prob = logits.sigmoid()  # (B, N, h, w)
        background = torch.prod(1 - prob, dim=1, keepdim=True)
        fg = (prob >= torch.maximum(background, prob.max(dim=1, keepdim=True)[0])).flatten(2)
        half = self.num_queries // 2
        per_head = (1, 1, self.num_heads, half, 1)
        block_fg = (~fg)[:, :, None, None, :].repeat(*per_head).flatten(0, 2)
        block_bg = fg[:, :, None, None, :].repeat(*per_head).flatten(0, 2)
        mask = torch.cat([block_fg, block_bg], dim=1)
        mask[mask.all(dim=-1)] = False
        return mask


class ObjectSummarizer(nn.Module):
    """Pools an object's mask value into `num_summaries` weighted averages, half inside
    the mask and half outside; returns sums and areas so memory can accumulate them."""

    def __init__(self, cfg: MatAnyOneNetConfig) -> None:
        super().__init__()
        os_ = cfg.object_summarizer
        e = os_.embed_dim
        self.num_summaries = os_.num_summaries
        self.pos_enc: PositionalEncoding | None = (
            PositionalEncoding(e, cfg.pixel_pe_scale, cfg.pixel_pe_temperature, channel_last=True)
            if os_.add_pe
            else None
        )
        self.input_proj = nn.Linear(cfg.value_dim, e)
        self.feature_pred = nn.Sequential(nn.Linear(e, e), nn.ReLU(inplace=True), nn.Linear(e, e))
        self.weights_pred = nn.Sequential(
            nn.Linear(e, e), nn.ReLU(inplace=True), nn.Linear(e, os_.num_summaries)
        )

    def forward(self, masks: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """masks: (B, N, H, W) in [0, 1]; value: (B, N, V, h, w) -> (B, N, Q, E+1)."""
        h, w = value.shape[-2:]
        inside = F.interpolate(masks, size=(h, w), mode="area").unsqueeze(-1)
        half = self.num_summaries // 2
        allowed = torch.cat([inside.expand(-1, -1, -1, -1, half), (1 - inside).expand(
            -1, -1, -1, -1, half)], dim=-1)  # fmt: skip
        x = self.input_proj(value.permute(0, 1, 3, 4, 2))
        if self.pos_enc is not None:
            x = x + self.pos_enc(h, w, x.device, x.dtype)
        x = x.float()
        weights = self.weights_pred(x).sigmoid() * allowed
        sums = torch.einsum("bnhwq,bnhwc->bnqc", weights, self.feature_pred(x))
        area = weights.flatten(2, 3).sum(2).unsqueeze(-1)
        return torch.cat([sums, area], dim=-1)
