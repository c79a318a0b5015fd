"""The state_dict layout of the published MatAnyone checkpoint (matanyone.pth, v1).

Written out from the published model definition's module tree (a Cutie derivative:
ResNet-50 pixel encoder whose layer1 is named `res2`, ResNet-18 mask encoder over
RGB + mask, key projection, pixel fuser, query transformer, object summarizer, a mask
decoder with strides 16..1 and seg/mat heads, the uncertainty head `temp_sparity`, and
the training-time `aux_computer.sensory_aux`), with the published sizes:
pixel/value/sensory/embed 256, key 64, 3 transformer blocks, 8 heads, 16 queries,
ff 2048, decoder up dims 256/128/128/64/16. Kept independent of wangend's network code
so that the comparison in test_network.py means something.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

Shape = tuple[int, ...]


def _conv(
    prefix: str, cout: int, cin: int, k: int, bias: bool = True
) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (cout, cin, k, k)
    if bias:
        yield f"{prefix}.bias", (cout,)


def _bn(prefix: str, c: int) -> Iterator[tuple[str, Shape]]:
    for name in ("weight", "bias", "running_mean", "running_var"):
        yield f"{prefix}.{name}", (c,)
    yield f"{prefix}.num_batches_tracked", ()


def _linear(prefix: str, cout: int, cin: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (cout, cin)
    yield f"{prefix}.bias", (cout,)


def _layernorm(prefix: str, c: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (c,)
    yield f"{prefix}.bias", (c,)


def _resnet_stage(prefix: str, bottleneck: bool, cin: int, width: int, count: int, stride: int):
    out = width * (4 if bottleneck else 1)
    for i in range(count):
        p = f"{prefix}.{i}"
        src = cin if i == 0 else out
        if bottleneck:
            yield from _conv(f"{p}.conv1", width, src, 1, bias=False)
            yield from _bn(f"{p}.bn1", width)
            yield from _conv(f"{p}.conv2", width, width, 3, bias=False)
            yield from _bn(f"{p}.bn2", width)
            yield from _conv(f"{p}.conv3", out, width, 1, bias=False)
            yield from _bn(f"{p}.bn3", out)
        else:
            yield from _conv(f"{p}.conv1", width, src, 3, bias=False)
            yield from _bn(f"{p}.bn1", width)
            yield from _conv(f"{p}.conv2", width, width, 3, bias=False)
            yield from _bn(f"{p}.bn2", width)
        if i == 0 and (stride != 1 or cin != out):
            yield from _conv(f"{p}.downsample.0", out, cin, 1, bias=False)
            yield from _bn(f"{p}.downsample.1", out)


def _eca_kernel(c: int) -> int:
    import math

    t = int((abs(math.log2(c)) + 1) // 2)
    return t if t % 2 else t + 1


def _ca_res(prefix: str, cin: int, cout: int):
    yield from _conv(f"{prefix}.conv1", cout, cin, 3)
    yield from _conv(f"{prefix}.conv2", cout, cout, 3)
    yield f"{prefix}.conv.weight", (1, 1, _eca_kernel(cout))
    if cin != cout:
        yield from _conv(f"{prefix}.downsample", cout, cin, 1)


def _fusion(prefix: str, x_in: int, g_in: int, out: int):
    yield from _conv(f"{prefix}.distributor.x_transform", out, x_in, 1)
    yield from _conv(f"{prefix}.distributor.g_transform", out, g_in, 1)
    yield from _ca_res(f"{prefix}.block1", out, out)
    yield from _ca_res(f"{prefix}.block2", out, out)


def _group_res(prefix: str, cin: int, cout: int):
    yield from _conv(f"{prefix}.conv1", cout, cin, 3)
    yield from _conv(f"{prefix}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{prefix}.downsample", cout, cin, 1)


def _mha(prefix: str, e: int):
    yield f"{prefix}.in_proj_weight", (3 * e, e)
    yield f"{prefix}.in_proj_bias", (3 * e,)
    yield from _linear(f"{prefix}.out_proj", e, e)


def official_keys(
    *, pixel=256, key=64, value=256, sensory=256, embed=256, ff=2048, blocks=3, queries=16,
    up=(256, 128, 128, 64, 16), mask_in=4,
) -> dict[str, Shape]:  # fmt: skip
    """Key -> shape of the published checkpoint (single-object mask encoder input)."""
    keys: dict[str, Shape] = {}

    def add(items) -> None:
        keys.update(items)

    # pixel encoder: ResNet-50 stem + layer1 (as res2) .. layer3
    add(_conv("pixel_encoder.conv1", 64, 3, 7, bias=False))
    add(_bn("pixel_encoder.bn1", 64))
    add(_resnet_stage("pixel_encoder.res2", True, 64, 64, 3, 1))
    add(_resnet_stage("pixel_encoder.layer2", True, 256, 128, 4, 2))
    add(_resnet_stage("pixel_encoder.layer3", True, 512, 256, 6, 2))
    ms = (1024, 512, 256, 64, 3)
    add(_conv("pix_feat_proj", pixel, ms[0], 1))
    # key projection
    add(_conv("key_proj.pix_feat_proj", pixel, ms[0], 1))
    add(_conv("key_proj.key_proj", key, pixel, 3))
    add(_conv("key_proj.d_proj", 1, pixel, 3))
    add(_conv("key_proj.e_proj", key, pixel, 3))
    # mask encoder: ResNet-18 over RGB + mask
    add(_conv("mask_encoder.conv1", 64, mask_in, 7, bias=False))
    add(_bn("mask_encoder.bn1", 64))
    add(_resnet_stage("mask_encoder.layer1", False, 64, 64, 2, 1))
    add(_resnet_stage("mask_encoder.layer2", False, 64, 128, 2, 2))
    add(_resnet_stage("mask_encoder.layer3", False, 128, 256, 2, 2))
    add(_fusion("mask_encoder.fuser", pixel, 256, value))
    add(_conv("mask_encoder.sensory_update.transform", sensory * 3, value + sensory, 3))
    # mask decoder
    g_dims = (up[0], up[1], up[2], up[3], up[4] + 1)
    for name, gd in zip(("g16", "g8", "g4", "g2", "g1"), g_dims, strict=True):
        add(_conv(f"mask_decoder.sensory_update.{name}_conv", sensory, gd, 1))
    add(_conv("mask_decoder.sensory_update.transform", sensory * 3, sensory * 2, 3))
    for i, (d_in, d_out) in enumerate(zip(ms[1:], up[:-1], strict=True)):
        add(_conv(f"mask_decoder.decoder_feat_proc.transforms.{i}", d_out, d_in, 1))
    names = ("up_16_8", "up_8_4", "up_4_2", "up_2_1")
    for name, (a, b) in zip(names, itertools.pairwise(up), strict=True):
        add(_group_res(f"mask_decoder.{name}.out_conv", a, b))
    add(_conv("mask_decoder.pred_seg", 1, up[-1], 3))
    add(_conv("mask_decoder.pred_mat", 1, up[-1], 3))
    # pixel fuser
    add(_fusion("pixel_fuser.fuser", pixel, value, embed))
    add(_conv("pixel_fuser.sensory_compress", value, sensory + mask_in - 3, 1))
    # object transformer
    ot = "object_transformer"
    for name in ("query_init", "query_emb"):
        keys[f"{ot}.{name}.weight"] = (queries, embed)
    add(_linear(f"{ot}.summary_to_query_init", embed, embed))
    add(_linear(f"{ot}.summary_to_query_emb", embed, embed))
    add(_conv(f"{ot}.pixel_init_proj", embed, embed, 1))
    add(_conv(f"{ot}.pixel_emb_proj", embed, embed, 1))
    keys[f"{ot}.spatial_pe.inv_freq"] = (embed // 4,)
    for i in range(blocks):
        p = f"{ot}.blocks.{i}"
        add(_mha(f"{p}.read_from_pixel.cross_attn", embed))
        add(_layernorm(f"{p}.read_from_pixel.norm", embed))
        add(_mha(f"{p}.self_attn.self_attn", embed))
        add(_layernorm(f"{p}.self_attn.norm", embed))
        add(_linear(f"{p}.ffn.linear1", ff, embed))
        add(_linear(f"{p}.ffn.linear2", embed, ff))
        add(_layernorm(f"{p}.ffn.norm", embed))
        add(_mha(f"{p}.read_from_query.cross_attn", embed))  # output norm off: no weights
        add(_ca_res(f"{p}.pixel_ffn.conv", embed, embed))
    for i in range(blocks + 1):
        add(_conv(f"{ot}.mask_pred.{i}.1", 1, embed, 1))
    # object summarizer
    keys["object_summarizer.pos_enc.inv_freq"] = (embed // 4,)
    add(_linear("object_summarizer.input_proj", embed, value))
    add(_linear("object_summarizer.feature_pred.0", embed, embed))
    add(_linear("object_summarizer.feature_pred.2", embed, embed))
    add(_linear("object_summarizer.weights_pred.0", embed, embed))
    add(_linear("object_summarizer.weights_pred.2", queries, embed))
    # training-time auxiliary head and the uncertainty head
    add(_conv("aux_computer.sensory_aux.projection", embed + 1, sensory, 1))
    add(_conv("temp_sparity.conv1x1_v2", 64, pixel * 2 + 1 + value, 1, bias=False))
    add(_bn("temp_sparity.bn1", 64))
    add(_conv("temp_sparity.conv3x3", 32, 64, 3, bias=False))
    add(_bn("temp_sparity.bn2", 32))
    add(_conv("temp_sparity.conv3x3_out", 1, 32, 3, bias=False))
    return keys
