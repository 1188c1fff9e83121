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


def t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 32):
    """A T5 (unigram) tokenizer: whole words as pieces, single characters as the fallback."""
    import string

    import transformers
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 4: only the fast class takes a vocab
        return _t5_tokenizer_fast(vocab, model_max_length)
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return T5Tokenizer.from_pretrained(folder, model_max_length=model_max_length)


def _t5_tokenizer_fast(vocab: list[tuple[str, float]], model_max_length: int):
    """The same tokenizer built with the tokenizers library, for transformers 4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def t5_encoder(tokenizer, d_model: int = 64, layers: int = 1, heads: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=d_model * 2, d_kv=d_model // heads,
                                   num_layers=layers, num_heads=heads, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


def tiny_sdxl_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS):
    """An SDXL-shaped pipeline: two CLIP encoders (the second with projection), text_time micro-conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(words), clip_tokenizer(words)
    hidden, hidden_2, time_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden + hidden_2, attention_head_dim=8, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden_2)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(force_upcast=True), text_encoder=clip_text_encoder(tokenizer, hidden_size=hidden),
        text_encoder_2=clip_text_encoder(tokenizer_2, hidden_size=hidden_2, projection_dim=hidden_2, with_projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=ddpm_scheduler())


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True, words: Iterable[str] = DEFAULT_WORDS):
    """An SD3-shaped pipeline: MMDiT transformer, two CLIP encoders and (optionally) T5, 16-channel VAE."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip_hidden, t5_dim = 32, 64  # joint_attention_dim = T5's width >= the two CLIP widths together
    tokenizers = [clip_tokenizer(words), clip_tokenizer(words)]
    encoders = [clip_text_encoder(t, hidden_size=clip_hidden, projection_dim=clip_hidden, with_projection=True)
                for t in tokenizers]
    tokenizer_3 = t5_tokenizer(words) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_dim, caption_projection_dim=32,
        pooled_projection_dim=2 * clip_hidden, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(shift=3.0),
        vae=tiny_vae(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                     use_post_quant_conv=False),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=t5_encoder(tokenizer_3, d_model=t5_dim) if with_t5 else None, tokenizer_3=tokenizer_3)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, words: Iterable[str] = DEFAULT_WORDS):
    """A Flux-shaped pipeline: packed 2x2 latents, CLIP pooled + T5, resolution-dependent shift."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    clip_hidden, t5_dim, latent_channels = 32, 64, 4
    tokenizer, tokenizer_2 = clip_tokenizer(words), t5_tokenizer(words)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_dim, pooled_projection_dim=clip_hidden,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                 base_image_seq_len=256, max_image_seq_len=4096),
        vae=tiny_vae(latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611,
                     use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text_encoder(tokenizer, hidden_size=clip_hidden), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2, d_model=t5_dim), tokenizer_2=tokenizer_2)


def tiny_chroma_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS):
    """A Chroma-shaped pipeline: Flux's packed latents and VAE, T5 alone (no CLIP, no guidance input)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    t5_dim, latent_channels = 64, 4
    tokenizer = t5_tokenizer(words)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_dim, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1)
    return ChromaPipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                 base_image_seq_len=256, max_image_seq_len=4096),
        vae=tiny_vae(latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611,
                     use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=t5_encoder(tokenizer, d_model=t5_dim), tokenizer=tokenizer)


# The chat-template words of Qwen-Image's and Z-Image's prompt templates, as whole tokens.
QWEN_WORDS = ("system", "user", "assistant", "describe", "Describe", "image", "by", "detailing", "color", "size",
              "texture", "quantity", "text", "spatial", "relationships", "objects", "background")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 64):
    """A Qwen2-style byte-level BPE tokenizer (words with and without a leading space as whole
    tokens), with Qwen's chat special tokens and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab, merges = list(_byte_symbols()), []
    for word in dict.fromkeys(w for base in (*words, *QWEN_WORDS) for w in (base, "Ġ" + base)):
        pieces = list(word)
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.append(pieces[0])
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return type(tokenizer).from_pretrained(folder)


def tiny_z_image_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS):
    """A Z-Image-shaped pipeline: single-stream DiT over 2x2 patches, Qwen3 prompt features (its
    penultimate layer), Flux's 16-channel VAE."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer, text_dim, latent_channels = qwen_tokenizer(words), 32, 16
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=text_dim, axes_dims=[4, 6, 6],
        axes_lens=[512, 32, 32])
    return ZImagePipeline(
        transformer=transformer, scheduler=flow_scheduler(shift=3.0),
        vae=tiny_vae(latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611,
                     use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tokenizer)


def tiny_qwen_image_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS):
    """A Qwen-Image-shaped pipeline: MMDiT over packed 2x2 latents, Qwen2.5-VL prompt features,
    the Wan-style 3D VAE with per-channel latents_mean/std."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer, text_dim, z_dim = qwen_tokenizer(words), 32, 4
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": text_dim, "intermediate_size": 2 * text_dim,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": text_dim, "fullatt_block_indexes": [0]}))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_dim, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.2])
    return QwenImagePipeline(
        transformer=transformer,
        # Qwen-Image's own scheduler also has shift_terminal=0.02, with which diffusers samples NaN in one step
        scheduler=flow_scheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                 base_image_seq_len=256, max_image_seq_len=8192),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
