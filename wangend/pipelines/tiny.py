"""A tiny Wan 2.1 text-to-video model, built offline from a fixed seed.

The demo and the tests need a real diffusers `WanPipeline` on machines with no network
and no weights. This module builds one: the same component classes as the released Wan
2.1 T2V checkpoints (transformer, VAE, UMT5 text encoder, a fast tokenizer, the UniPC
flow scheduler), only a few thousand times smaller. Its output is noise, but every code
path a real model takes (loading, prompt encoding, denoising with CFG, frame-by-frame VAE
decode) runs for real, in a fraction of a second on a CPU.

The folder is written with `save_pretrained` (safetensors only) and loaded back through
the same `from_pretrained` path as any user model, so nothing about it is special once it
is on disk. The same seed always gives the same weights: initialisation runs under a
forked, seeded torch RNG, so building never disturbs the process's own random state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["TINY_SEED", "TINY_VERSION", "build_tiny_pipeline", "ensure_tiny_model"]

TINY_SEED = 20240229
# Bump when the configs below change, so a folder built by an older wangend is rebuilt.
TINY_VERSION = 1
MARKER = "wangend-tiny.json"
# A temp build folder older than this is left over from a crash (a live build takes ~1 s).
STALE_BUILD_SECONDS = 600.0


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
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_pipeline(seed: int = TINY_SEED):
    """Build the tiny `WanPipeline` in memory. Deterministic for a given seed."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
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
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()
    # The released Wan 2.1 checkpoints ship this scheduler; flow_shift is set per job.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _marker_ok(folder: Path, seed: int) -> bool:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict) and data.get("version") == TINY_VERSION and data.get("seed") == seed
    )


def _remove_stale_builds(models_dir: Path) -> None:
    now = time.time()
    for entry in models_dir.glob(".tiny.*.tmp"):
        try:
            if now - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def ensure_tiny_model(models_dir: Path, seed: int = TINY_SEED) -> Path:
    """Make sure `models_dir/tiny` holds a complete tiny model and return the folder.

    The model is built in a temp folder beside the target and renamed into place, and the
    marker file is written last, so a folder without a valid marker (a crash, an older
    version) is rebuilt. If another process finishes first, its folder is kept.
    """
    models_dir = Path(models_dir)
    target = models_dir / "tiny"
    if _marker_ok(target, seed):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(models_dir)
    build = Path(tempfile.mkdtemp(prefix=".tiny.", suffix=".tmp", dir=models_dir))
    try:
        build_tiny_pipeline(seed).save_pretrained(build, safe_serialization=True)
        marker = {"version": TINY_VERSION, "seed": seed, "built_at": time.time()}
        (build / MARKER).write_text(json.dumps(marker), encoding="utf-8")
        if target.exists() and not _marker_ok(target, seed):
            # Move the broken or outdated folder aside first: rename is atomic, rmtree is not.
            trash = Path(tempfile.mkdtemp(prefix=".tiny.", suffix=".tmp", dir=models_dir))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(build, target)
        except OSError:
            if not _marker_ok(target, seed):  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target
