"""A diffusers FLUX.2 LoRA in Black Forest Labs' own module names, the single-file form for ComfyUI.

ComfyUI runs FLUX.2 on the BFL checkpoint's modules and accepts a LoRA for any of them by its
generic name, `diffusion_model.<module>` with `.lora_A/.lora_B.weight` (comfy/lora.py,
model_lora_keys_unet); ai-toolkit writes FLUX.2 LoRAs this way and diffusers' Flux2 loader reads
them (`_convert_non_diffusers_flux2_lora_to_diffusers`). ComfyUI's diffusers-name map
(`flux_to_diffusers`) is FLUX.1's and knows none of FLUX.2's linear_in / to_qkv_mlp_proj layers.

The names are diffusers' single-file converter read backwards. BFL fuses q, k and v of each
double-stream block into one `qkv` layer: their three LoRAs become one of three times the rank
(the downs stacked, the ups block-diagonal), which changes the fused weight exactly as the three
did. BFL's final modulation holds (shift, scale) where diffusers' norm_out holds (scale, shift),
so that LoRA's up halves are swapped. The LoRA scale is folded into the ups (no `.alpha`). A DoRA
`dora_scale` goes per output row, so a fused layer's is its parts' stacked, and swapped as its ups are.
"""

from __future__ import annotations

import torch

RENAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
          "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
FUSED = {("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
         ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv"}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
SWAPPED_HALVES = {"norm_out.linear"}
PREFIX = "diffusion_model."


def bfl_name(module: str) -> tuple[str, int | None]:
    """BFL's module for a diffusers one, and which third of a fused qkv it is (None: all of it)."""
    if module in RENAMES:
        return RENAMES[module], None
    head, index, rest = module.split(".", 2)
    if head == "single_transformer_blocks" and rest in SINGLE:
        return f"single_blocks.{index}.{SINGLE[rest]}", None
    if head == "transformer_blocks":
        if rest in DOUBLE:
            return f"double_blocks.{index}.{DOUBLE[rest]}", None
        for parts, fused in FUSED.items():
            if rest in parts:
                return f"double_blocks.{index}.{fused}", parts.index(rest)
    raise ValueError(f"no BFL module for FLUX.2 layer '{module}'")


def swapped(rows: torch.Tensor) -> torch.Tensor:
    scale, shift = rows.chunk(2, dim=0)
    return torch.cat([shift, scale])


def to_bfl_lora(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                dora_scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """diffusers module -> (down, up with the scale folded in) to the BFL-named file; a DoRA
    adapter's dora_scale per module beside them."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused_scales: dict[str, dict[int, torch.Tensor]] = {}
    for module, (down, up) in pairs.items():
        name, part = bfl_name(module)
        if part is not None:
            fused.setdefault(name, {})[part] = (down, up)
            if dora_scales is not None:
                fused_scales.setdefault(name, {})[part] = dora_scales[module]
            continue
        if module in SWAPPED_HALVES:
            up = swapped(up)
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = down, up
        if dora_scales is not None:
            rows = dora_scales[module]
            out[f"{PREFIX}{name}.dora_scale"] = swapped(rows) if module in SWAPPED_HALVES else rows
    for name, scales in fused_scales.items():
        if len(scales) != 3:  # the parts left out would need their own base rows' norms
            raise ValueError(f"DoRA on part of FLUX.2's fused {name} (q, k and v go together) has no single-file form")
        out[f"{PREFIX}{name}.dora_scale"] = torch.cat([scales[p] for p in range(3)])
    for name, parts in fused.items():
        rows = next(iter(parts.values()))[1].shape[0]  # q, k and v are equally wide
        downs = [parts[p][0] for p in sorted(parts)]
        ups = torch.zeros(3 * rows, sum(d.shape[0] for d in downs), dtype=downs[0].dtype)
        column = 0
        for p in sorted(parts):
            down, up = parts[p]
            ups[p * rows:(p + 1) * rows, column:column + down.shape[0]] = up
            column += down.shape[0]
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = torch.cat(downs), ups
    return {key: tensor.contiguous() for key, tensor in out.items()}
