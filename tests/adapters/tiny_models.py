"""Tiny random models for the prompt-enhancer tests, built in memory from a fixed seed and
saved as safetensors (no download): a chat LM for the local enhancer and a Florence-2 in
transformers' native layout for the captioner. Their output is gibberish; the tests check
the plumbing, not the words."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# One 32-pixel cell of the 4 stride-2 stages after a stride-4 stem -> a 2x2 grid, and the
# projector adds one pooled token: 5 image tokens per picture.
FLORENCE_IMAGE_SIZE = 64
FLORENCE_IMAGE_TOKENS = (FLORENCE_IMAGE_SIZE // 32) ** 2 + 1


def write_tiny_lm(folder: Path) -> Path:
    """A one-layer Llama with the project's byte-level tokenizer and a plain chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wangend.pipelines.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert not list(folder.glob("*.bin"))
    return folder


def florence_tokenizer():
    """A BART-like byte-level tokenizer with what Florence2Processor reads: `<s>`/`</s>`
    around the prompt, an `image_token` (`<image>`, repeated once per image feature) and the
    `<loc_0>`..`<loc_999>` location tokens the post-processor parses."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=1024,
    )
    tokenizer.add_tokens([AddedToken(f"<loc_{i}>", special=True) for i in range(1000)])
    return tokenizer


def write_tiny_florence2(folder: Path) -> Path:
    """Florence-2 (DaViT vision tower + BART) at toy size, with its processor: a CLIP image
    processor resizing to 64x64 and a `post_processor_config` listing `pure_text`, as the
    converted checkpoints ship (without it transformers cannot post-process a caption)."""
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    tokenizer = florence_tokenizer()
    side = {"height": FLORENCE_IMAGE_SIZE, "width": FLORENCE_IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(
        size=side, crop_size=side, do_center_crop=False, image_seq_length=FLORENCE_IMAGE_TOKENS
    )
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config={"pure_text": {}},
    )
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 8, 16, 16],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=16,
        drop_path_rate=0.0,
        max_position_embeddings=8,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=1024,  # room for the captioner's 256 new tokens
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    config = Florence2Config(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        model = Florence2ForConditionalGeneration(config)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    assert not list(folder.glob("*.bin"))
    return folder
