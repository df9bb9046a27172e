"""Tiny randomly initialised Stable Diffusion folders (diffusers layout) for tests and CPU benchmarks.

They exercise exactly the loading / LoRA / sampling code that real SD 1.5, 2.x and SDXL weights
go through, with a few hundred thousand parameters instead of a billion.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_tokenizer(folder: Path, max_length: int = 16) -> None:
    """Byte-level CLIP BPE vocabulary (every byte, with and without </w>), no merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")


def build_tiny_sd(folder: str | Path, family: str = "sd", seed: int = 0, prediction_type: str = "epsilon",
                  width: int = 32) -> Path:
    """Write a tiny random SD ("sd": 1.5/2.x layout) or SDXL ("sdxl") pipeline folder and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    text_dim, max_len = 32, 16
    te_cfg = CLIPTextConfig(vocab_size=1000, hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=max_len, projection_dim=text_dim,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    sdxl = family == "sdxl"
    unet_kw = {}
    if sdxl:
        unet_kw = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": text_dim + 6 * 8}
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(width, width * 2),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim * (2 if sdxl else 1), attention_head_dim=4, norm_num_groups=8, **unet_kw)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder / "tokenizer", max_len)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(te_cfg)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        write_tiny_tokenizer(folder / "tokenizer_2", max_len)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=CLIPTextModelWithProjection(te_cfg),
                                         tokenizer=tok, tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
                                         unet=unet, scheduler=sched)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
