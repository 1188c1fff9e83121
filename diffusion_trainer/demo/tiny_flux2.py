"""Tiny FLUX.2 pipelines (dev: Mistral 3 text encoder, klein: Qwen3), built offline from configs.

The text encoders are deep enough for the layers the pipelines read their prompt embedding from
((10, 20, 30) for dev, (9, 18, 27) for klein) but a few numbers wide. The tokenizer is one word-level
tokenizer with a chat template that takes both message forms the two pipelines send (content as a
string, or as a list of text parts); special tokens are matched before words are split.
"""

from __future__ import annotations

import string
import tempfile
from typing import Iterable

import torch

from .tiny_models import DEFAULT_WORDS, flow_scheduler

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]",
           "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[IMG]"]
# Mistral's form for dev (system prompt, then the user's text), ChatML for klein's Qwen3.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set text = m['content'] if m['content'] is string else (m['content'] | map(attribute='text') | join(' ')) -%}"
    "{%- if m['role'] == 'system' -%}<s>[SYSTEM_PROMPT] {{ text }} [/SYSTEM_PROMPT]"
    "{%- else -%}<|im_start|> {{ m['role'] }} [INST] {{ text }} [/INST] <|im_end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%} <|im_start|> assistant <think> </think>{%- endif -%}")


def chat_tokenizer(words: Iterable[str] = DEFAULT_WORDS, extra_words: Iterable[str] = ()):
    """A word-level fast tokenizer (unknown words: <unk>) with the chat template above, saved and
    reloaded as a pipeline folder would hold it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = list(dict.fromkeys([*SPECIAL, *words, *extra_words, *string.punctuation, "user", "system",
                                "assistant"]))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", additional_special_tokens=SPECIAL[4:],
                                        model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def mistral3_encoder(tokenizer, hidden: int = 16, layers: int = 30):
    """Mistral3ForConditionalGeneration (FLUX.2-dev's text encoder) with a one-layer vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": hidden // 2, "max_position_embeddings": 1024,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1)
    return Mistral3ForConditionalGeneration(config)


def qwen3_encoder(tokenizer, hidden: int = 16, layers: int = 27):
    """Qwen3ForCausalLM (FLUX.2-klein's text encoder)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))


def flux2_vae(latent_channels: int = 4):
    """AutoencoderKLFlux2 with four blocks (scale factor 8), its batch-norm statistics made non-trivial
    so that the latent normalisation shows in every test."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8,
        sample_size=64, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, channels))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, channels))
    return vae


def flux2_transformer(text_hidden: int, guidance_embeds: bool, latent_channels: int = 4):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_hidden, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)


def flux2_scheduler():
    """FLUX.2's scheduler config (the pipeline passes its own resolution- and step-dependent mu)."""
    return flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def tiny_flux2_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS):
    """FLUX.2-dev-shaped: Mistral 3 prompt embedding (3 layers stacked), guidance input, 2x2-patchified
    batch-norm latents."""
    from diffusers import Flux2Pipeline

    torch.manual_seed(seed)
    tokenizer, hidden = chat_tokenizer(words), 16
    return Flux2Pipeline(scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=mistral3_encoder(tokenizer, hidden),
                         tokenizer=tokenizer, transformer=flux2_transformer(hidden, guidance_embeds=True))


def tiny_flux2_klein_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS):
    """FLUX.2-klein-shaped: Qwen3 prompt embedding, no guidance input (real CFG when sampling)."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer, hidden = chat_tokenizer(words), 16
    return Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=flux2_vae(),
                              text_encoder=qwen3_encoder(tokenizer, hidden), tokenizer=tokenizer,
                              transformer=flux2_transformer(hidden, guidance_embeds=False))
