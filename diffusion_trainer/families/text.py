"""Text encoders shared by several families: CLIP (last, penultimate, pooled) and T5."""

from __future__ import annotations

import torch


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def clip_penultimate_and_pooled(tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate layer's hidden states (SDXL, SD3) and the encoder's first output: the
    projected pooled embedding for CLIPTextModelWithProjection."""
    out = encoder(token_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def clip_pooled(tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
    """CLIPTextModel's pooled output (Flux's global conditioning)."""
    return encoder(token_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=False).pooler_output


def t5_hidden_states(tokenizer, encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    return encoder(token_ids(tokenizer, prompts, max_length).to(encoder.device))[0]
