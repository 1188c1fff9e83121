"""DoRA in the single file: the `dora_scale` with which ComfyUI rebuilds peft's DoRA weight.

peft (tuners/lora/dora.py) trains W' = m (W + dW) / ||W + dW||, the norm taken per output row
(per output channel of a conv), m its `lora_magnitude_vector`. ComfyUI (comfy/weight_adapter/base.py,
`weight_decompose`) reads `<name>.dora_scale` beside the LoRA: when its first axis is the weight's
output axis it computes W' = (W + dW) * dora_scale / (||W|| + eps), the norm of the *base* weight's
rows and eps that of float32, the dtype it patches in. The two agree for
dora_scale = m (||W|| + eps) / ||W + dW||, shaped [out, 1, ...]. That needs the base weights, so the
file is written where they are: by the run, or by `export` after loading the base model.
"""

from __future__ import annotations

import torch


def comfy_dora_scale(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """ComfyUI's dora_scale for base `weight`, LoRA change `delta` (at the trained strength) and
    peft's magnitude (shape [out], or [1, out, 1, 1] for a conv)."""
    rows = weight.detach().double().flatten(1)
    merged = rows + delta.detach().double().reshape(rows.shape)
    eps = torch.finfo(torch.float32).eps
    scale = magnitude.detach().double().reshape(-1) * (rows.norm(dim=1) + eps) / merged.norm(dim=1)
    return scale.reshape(weight.shape[0], *[1] * (weight.dim() - 1)).float().contiguous()


def base_weight(module: torch.nn.Module, path: str) -> torch.Tensor:
    """The base weight of layer `path` in `module` (a plain model, or one holding peft's layers),
    dequantized as peft's DoRA reads it. transformers 5's CLIP has no `text_model.` level."""
    from peft.utils.integrations import dequantize_module_weight

    try:
        layer = module.get_submodule(path)
    except AttributeError:
        layer = module.get_submodule(path.removeprefix("text_model."))
    if hasattr(layer, "get_base_layer"):
        layer = layer.get_base_layer()
    return dequantize_module_weight(layer)
