"""Tiny Wan models, one per family, built offline from fixed seeds.

The demo and the tests need real diffusers pipelines on machines with no network and no
weights. This module builds them: the same component classes as the released Wan 2.1 and
2.2 checkpoints (transformers, VAE, UMT5 text encoder, a CLIP image encoder where Wan 2.1
I2V has one, a fast tokenizer, the UniPC flow scheduler), only a few thousand times
smaller. Their output is noise, but every code path a real model takes (loading, prompt
and image encoding, denoising with CFG, the expert switch of Wan 2.2, frame-by-frame VAE
encode and decode) runs for real, in a fraction of a second on a CPU.

| name           | family      | pipeline                  | what makes it that family            |
|----------------|-------------|---------------------------|--------------------------------------|
| tiny           | wan2.1-t2v  | WanPipeline               | 16-channel transformer               |
| tiny-i2v       | wan2.1-i2v  | WanImageToVideoPipeline   | in_channels 36 + CLIP image encoder  |
| tiny-vace      | wan2.1-vace | WanVACEPipeline           | WanVACETransformer3DModel            |
| tiny-wan22     | wan2.2-t2v  | WanPipeline               | transformer_2 + boundary_ratio       |
| tiny-wan22-i2v | wan2.2-i2v  | WanImageToVideoPipeline   | two experts, in_channels 36, no CLIP |
| tiny-ti2v      | wan2.2-ti2v | WanPipeline               | 48-channel VAE, expand_timesteps     |

Each folder is written with `save_pretrained` (safetensors only) and loaded back through
the same `from_pretrained` path as any user model, so nothing about it is special once it
is on disk. The same seed always gives the same weights: initialisation runs under a
forked, seeded torch RNG, so building never disturbs the process's own random state.
"tiny" is built exactly as it always was, so its outputs stay reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .catalog import TINY_ROPE_SPAN

__all__ = [
    "TINY_NAMES",
    "TINY_SEED",
    "TINY_VERSION",
    "build_tiny_pipeline",
    "build_tiny_variant",
    "ensure_tiny_model",
]

TINY_SEED = 20240229
# Bump when the configs below change, so a folder built by an older wangend is rebuilt.
TINY_VERSION = 1
MARKER = "wangend-tiny.json"
# A temp build folder older than this is left over from a crash (a live build takes ~1 s).
STALE_BUILD_SECONDS = 600.0
TEXT_DIM = 32
CLIP_DIM = 4  # hidden size of the tiny CLIP image encoder (the transformer's image_dim)


def build_tokenizer():
    """A byte-level tokenizer made in memory: every UTF-8 prompt maps to real ids (no
    <unk>), so different prompts give different embeddings even in the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Like T5: the sequence ends with </s>, padding uses id 0.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=512,
    )


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
        )
    ).eval()


def _vae(wide: bool = False):
    """The Wan 2.1 VAE layout (16 latent channels, 8x spatial), or with `wide` the Wan
    2.2 one (48 channels, 2x2 pixel patches, residual blocks, 16x spatial)."""
    from diffusers import AutoencoderKLWan

    extra: dict[str, Any] = {}
    if wide:
        extra = {
            "z_dim": 48,
            "in_channels": 12,
            "out_channels": 12,
            "is_residual": True,
            "patch_size": 2,
            "scale_factor_spatial": 16,
            "latents_mean": [0.0] * 48,
            "latents_std": [1.0] * 48,
        }
    else:
        extra = {"z_dim": 16}
    return AutoencoderKLWan(
        base_dim=3,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        **extra,
    ).eval()


def _transformer(
    in_channels: int = 16,
    out_channels: int = 16,
    kind: str = "WanTransformer3DModel",
    **extra: Any,
):
    """The tiny Wan transformer (`kind`: its diffusers class; VACE adds its branch)."""
    import diffusers

    return getattr(diffusers, kind)(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=TINY_ROPE_SPAN,
        **extra,
    ).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    # The released Wan checkpoints ship this scheduler; flow_shift is set per job.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
    )


def _seeded(seed: int, *modules: Callable[[], Any], wide_vae: bool = False) -> dict[str, Any]:
    """The parts every tiny pipeline shares, then `modules()` each, built in one fixed
    order from `seed` (the order is what fixes the weights: tokenizer, text encoder,
    VAE, then the transformers and encoders the family adds)."""
    import torch

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(len(tokenizer))
        vae = _vae(wide=True) if wide_vae else _vae()
        built = [make() for make in modules]
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}
    return {**parts, "scheduler": _scheduler(), "built": built}


def _assemble(cls: Any, parts: dict[str, Any], **components: Any) -> Any:
    shared = {k: v for k, v in parts.items() if k != "built"}
    return cls(**shared, **components)


def build_tiny_pipeline(seed: int = TINY_SEED):
    """Build the tiny Wan 2.1 T2V `WanPipeline` in memory. Deterministic for a seed."""
    from diffusers import WanPipeline

    parts = _seeded(seed, _transformer)
    return _assemble(WanPipeline, parts, transformer=parts["built"][0])


def _tiny_clip() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=CLIP_DIM,
        projection_dim=CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(config).eval()


def _build_i2v(seed: int):
    """Wan 2.1 I2V: 36 input channels (16 noise + 4 mask + 16 image latents) and CLIP
    image embeddings fed to the cross-attention through `added_kv_proj_dim`."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor

    parts = _seeded(
        seed,
        lambda: _transformer(in_channels=36, image_dim=CLIP_DIM, added_kv_proj_dim=24),
        _tiny_clip,
    )
    transformer, image_encoder = parts["built"]
    return _assemble(
        WanImageToVideoPipeline,
        parts,
        image_processor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
        image_encoder=image_encoder,
        transformer=transformer,
    )


def _tiny_vace_transformer() -> Any:
    return _transformer(kind="WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=96)


def _build_vace(seed: int):
    """Wan 2.1 VACE: a VACE branch at block 0 reading 96 channels (16 inactive + 16
    reactive video latents + 64 = 8x8 unfolded mask)."""
    from diffusers import WanVACEPipeline

    parts = _seeded(seed, _tiny_vace_transformer)
    return _assemble(WanVACEPipeline, parts, transformer=parts["built"][0])


def _build_wan22(seed: int):
    """Wan 2.2 A14B T2V: a high-noise expert (`transformer`) and a low-noise one
    (`transformer_2`), switched at boundary_ratio * 1000 timesteps."""
    from diffusers import WanPipeline

    parts = _seeded(seed, _transformer, _transformer)
    high, low = parts["built"]
    return _assemble(WanPipeline, parts, transformer=high, transformer_2=low, boundary_ratio=0.875)


def _build_wan22_i2v(seed: int):
    """Wan 2.2 A14B I2V: two experts with 36 input channels and no image encoder."""
    from diffusers import WanImageToVideoPipeline

    def expert() -> Any:
        return _transformer(in_channels=36)

    parts = _seeded(seed, expert, expert)
    high, low = parts["built"]
    return _assemble(
        WanImageToVideoPipeline, parts, transformer=high, transformer_2=low, boundary_ratio=0.9
    )


def _build_ti2v(seed: int):
    """Wan 2.2 TI2V 5B: the 48-channel VAE and per-token timesteps (`expand_timesteps`),
    which is how the same weights also take a start image."""
    from diffusers import WanPipeline

    parts = _seeded(seed, lambda: _transformer(in_channels=48, out_channels=48), wide_vae=True)
    return _assemble(WanPipeline, parts, transformer=parts["built"][0], expand_timesteps=True)


BUILDERS: dict[str, Callable[[int], Any]] = {
    "tiny": build_tiny_pipeline,
    "tiny-i2v": _build_i2v,
    "tiny-vace": _build_vace,
    "tiny-wan22": _build_wan22,
    "tiny-wan22-i2v": _build_wan22_i2v,
    "tiny-ti2v": _build_ti2v,
}
TINY_NAMES: tuple[str, ...] = tuple(BUILDERS)


def build_tiny_variant(name: str, seed: int = TINY_SEED):
    """Build the tiny pipeline called `name` (one of TINY_NAMES) in memory."""
    if name not in BUILDERS:
        raise ValueError(f"no tiny model called {name!r}; known: {', '.join(TINY_NAMES)}")
    return BUILDERS[name](seed)


def _marker_ok(folder: Path, seed: int, name: str = "tiny") -> bool:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("version") == TINY_VERSION
        and data.get("seed") == seed
        and data.get("name", "tiny") == name
    )


def _remove_stale_builds(models_dir: Path) -> None:
    """Remove the temp folders of builds that will never finish: their builder (its pid
    is in the name) is gone, or they are older than STALE_BUILD_SECONDS. A kill during a
    build leaves one; a live builder's is kept."""
    now = time.time()
    for entry in models_dir.glob(".tiny.*.tmp"):
        pid = entry.name.split(".")[2]
        try:
            alive = pid.isdigit() and _alive(int(pid))
            if not alive or now - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def ensure_tiny_model(models_dir: Path, seed: int = TINY_SEED, name: str = "tiny") -> Path:
    """Make sure `models_dir/<name>` holds a complete tiny model and return the folder.

    The model is built in a temp folder beside the target and renamed into place, and the
    marker file is written last, so a folder without a valid marker (a crash, an older
    version) is rebuilt. If another process finishes first, its folder is kept.
    """
    if name not in BUILDERS:
        raise ValueError(f"no tiny model called {name!r}; known: {', '.join(TINY_NAMES)}")
    models_dir = Path(models_dir)
    target = models_dir / name
    if _marker_ok(target, seed, name):
        if models_dir.is_dir():
            _remove_stale_builds(models_dir)
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(models_dir)
    build = Path(tempfile.mkdtemp(prefix=f".tiny.{os.getpid()}.", suffix=".tmp", dir=models_dir))
    try:
        build_tiny_variant(name, seed).save_pretrained(build, safe_serialization=True)
        marker: dict[str, Any] = {"version": TINY_VERSION, "seed": seed, "built_at": time.time()}
        if name != "tiny":  # "tiny" keeps the marker it always had
            marker["name"] = name
        (build / MARKER).write_text(json.dumps(marker), encoding="utf-8")
        if target.exists() and not _marker_ok(target, seed, name):
            # Move the broken or outdated folder aside first: rename is atomic, rmtree is not.
            trash = Path(
                tempfile.mkdtemp(prefix=f".tiny.{os.getpid()}.", suffix=".tmp", dir=models_dir)
            )
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(build, target)
        except OSError:
            if not _marker_ok(target, seed, name):  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target
