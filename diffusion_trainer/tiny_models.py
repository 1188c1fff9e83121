"""Tiny diffusers pipelines built offline from configs, with tokenizers written locally.

Nothing is downloaded: the demo, the tests and the benchmark build their models here
(random weights unless trained), save them with `save_pretrained`, and then load them
through the same code path a hub model takes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

import torch

# Words that become single tokens; anything else is spelled out in byte-level pieces.
DEFAULT_WORDS = (
    "a", "an", "the", "of", "on", "in", "at", "and", "with", "photo", "picture", "small", "large", "big",
    "medium", "left", "right", "top", "bottom", "center", "middle", "red", "green", "blue", "yellow",
    "purple", "orange", "white", "black", "circle", "square", "triangle", "star", "shape", "sks",
)


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte-to-unicode table, which CLIP's BPE vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A CLIP BPE tokenizer with the given whole-word merges, written to and loaded from disk."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.append(pieces[0])
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def clip_text_encoder(tokenizer, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                      projection_dim: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae(latent_channels: int = 4, block_out_channels=(8, 16, 16, 16), **extra):
    """Four blocks, so the scale factor is 8 as in the real VAEs."""
    from diffusers import AutoencoderKL

    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=block_out_channels,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        layers_per_block=1, norm_num_groups=8, sample_size=64, **extra)


def ddpm_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", words: Iterable[str] = DEFAULT_WORDS,
                     unet_channels=(32, 64), text_hidden: int = 32):
    """A Stable Diffusion 1.x-shaped pipeline: 64x64 images, 8x8x4 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=8)
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(tokenizer, hidden_size=text_hidden), tokenizer=tokenizer,
        unet=unet, scheduler=ddpm_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def save_pipeline(pipeline, path: Path) -> Path:
    path = Path(path)
    pipeline.save_pretrained(str(path), safe_serialization=True)
    return path
