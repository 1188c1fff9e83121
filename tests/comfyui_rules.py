"""What ComfyUI does with a LoRA file, rebuilt from its documented behaviour for the tests.

Written from reading ComfyUI's comfy/lora.py and comfy/utils.py (GPL; nothing is copied). Mirrors:
- `model_lora_keys_unet`: the LoRA names it accepts for a model. For UNets, `lora_unet_<name>` with
  the name's '.' as '_', for every `<name>.weight` that `utils.unet_to_diffusers` maps from
  diffusers' UNet layout to ComfyUI's own LDM layout; for SD3 `transformer.<name>` over
  `utils.mmdit_to_diffusers`; for Flux `transformer.<name>` over `utils.flux_to_diffusers`.
- `load_lora`: for each accepted name, `.lora_up/.lora_down.weight` (or `.lora_B/.lora_A.weight`)
  and an optional `.alpha`; every other key is reported as "lora key not loaded".
- `model_lora_keys_clip`: the CLIP encoders' kohya names (`lora_te_`, `lora_te1_`, `lora_te2_` +
  `text_model_encoder_layers_<b>_<layer>`), per family (see CLIP_PREFIXES).
- comfy/weight_adapter's LoKr and LoHa: `lokr_w1`/`lokr_w2` (or their `_a`/`_b` factors, alpha / rank
  applied only when a factor is decomposed) and `hada_w1_a…` (alpha / rank).
- `calculate_weight` for a plain LoRA: delta = (alpha / rank if `.alpha` exists else 1.0)
  * up.flatten(1) @ down.flatten(1), reshaped to the weight.

Coverage of the UNet map: what `unet_to_diffusers` lists for each down/mid/up block (resnets:
conv1, conv2, time_emb_proj, conv_shortcut; attentions: proj_in, proj_out and, per transformer
block, attn1/attn2 to_q/to_k/to_v/to_out.0 and ff.net.0.proj/ff.net.2; down/upsampler convs) and
its basic entries (conv_in, conv_out, time_embedding, add_embedding, class_embedding). ComfyUI
derives its UNet config (res blocks and transformer depth per block) from the checkpoint; here it
is derived from the diffusers UNet's config, which describes the same structure. Norm weights are
left out: a LoRA never targets them. The SD3/Flux maps list the linear layers ComfyUI maps (it
also maps norms and q/k norms, which no LoRA targets).
"""

from __future__ import annotations

from typing import Any

import torch

# unet_to_diffusers' per-part names: diffusers name -> ComfyUI (LDM) name.
RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
ATTENTION_PARTS = ("proj_in", "proj_out")
TRANSFORMER_BLOCK_PARTS = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2")
UNET_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
              "class_embedding.linear_2": "label_emb.0.2"}


def _per_block(value: Any, count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def unet_module_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module name -> ComfyUI LDM module name, for a UNet2DConditionModel config."""
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    blocks = len(down_types)
    layers = _per_block(config["layers_per_block"], blocks)
    depth = _per_block(config.get("transformer_layers_per_block", 1), blocks)
    up_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    names: dict[str, str] = {}

    def attention(prefix: str, to: str, transformers: int) -> None:
        for part in ATTENTION_PARTS:
            names[f"{prefix}.{part}"] = f"{to}.{part}"
        for t in range(transformers):
            for part in TRANSFORMER_BLOCK_PARTS:
                names[f"{prefix}.transformer_blocks.{t}.{part}"] = f"{to}.transformer_blocks.{t}.{part}"

    def resnet(prefix: str, to: str) -> None:
        for part, ldm in RESNET_PARTS.items():
            names[f"{prefix}.{part}"] = f"{to}.{ldm}"

    for x in range(blocks):  # input_blocks: 1 + (res blocks + 1) per level, then a downsampler
        n = 1 + (layers[x] + 1) * x
        for i in range(layers[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if "CrossAttn" in down_types[x]:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth[x])
            n += 1
        names[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    if "CrossAttn" in config.get("mid_block_type", "UNetMidBlock2DCrossAttn"):
        attention("mid_block.attentions.0", "middle_block.1", depth[-1])
    for i, n in enumerate((0, 2)):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    up_layers = list(reversed(layers))
    for x in range(blocks):  # output_blocks: res blocks + 1 per level, the last with an upsampler
        n = (up_layers[x] + 1) * x
        for i in range(up_layers[x] + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            attends = "CrossAttn" in up_types[x]
            if attends:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", _per_block(up_depth, blocks)[x])
            if i == up_layers[x]:
                names[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if attends else 1}.conv"
            n += 1
    names.update(UNET_BASIC)
    return names


def mmdit_module_names(config: dict[str, Any]) -> set[str]:
    """diffusers SD3 transformer module names that mmdit_to_diffusers maps."""
    per_block = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2", "norm1.linear", "norm1_context.linear")
    names = {f"transformer_blocks.{i}.{part}" for i in range(config["num_layers"]) for part in per_block}
    return names | {"context_embedder", "pos_embed.proj", "norm_out.linear", "proj_out",
                    *(f"time_text_embed.{e}_embedder.linear_{j}" for e in ("timestep", "text") for j in (1, 2))}


def flux_module_names(config: dict[str, Any]) -> set[str]:
    """diffusers Flux transformer module names that flux_to_diffusers maps."""
    double = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
              "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")
    names = {f"transformer_blocks.{i}.{p}" for i in range(config["num_layers"]) for p in double}
    names |= {f"single_transformer_blocks.{i}.{p}" for i in range(config["num_single_layers"]) for p in single}
    return names | {"proj_out", "x_embedder", "context_embedder", "norm_out.linear",
                    *(f"time_text_embed.{e}_embedder.linear_{j}" for e in ("timestep", "text", "guidance")
                      for j in (1, 2))}


def accepted_lora_names(family_form: str, denoiser_config: dict[str, Any], is_flux: bool = False) -> dict[str, str]:
    """LoRA name in the file -> diffusers module name, as model_lora_keys_unet accepts them."""
    if family_form == "kohya":
        return {"lora_unet_" + name.replace(".", "_"): name for name in unet_module_map(denoiser_config)}
    names = flux_module_names(denoiser_config) if is_flux else mmdit_module_names(denoiser_config)
    return {f"transformer.{name}": name for name in names}


def load_lora(lora: dict[str, torch.Tensor], accepted: dict[str, str]):
    """(patches: module -> (up, down, alpha or None), keys ComfyUI would leave unloaded)."""
    patches, loaded = {}, set()
    for name, module in accepted.items():
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if name + up in lora:
                alpha = lora[name + ".alpha"].item() if name + ".alpha" in lora else None
                patches[module] = (lora[name + up], lora[name + down], alpha)
                loaded |= {name + up, name + down} | ({name + ".alpha"} if alpha is not None else set())
                break
    return patches, sorted(set(lora) - loaded)


def weight_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None, shape: torch.Size) -> torch.Tensor:
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return (scale * (up.flatten(1).double() @ down.flatten(1).double())).reshape(shape)


# --- text encoders (model_lora_keys_clip) and LyCORIS types (comfy/weight_adapter) --------------
# LORA_CLIP_MAP: the CLIP layers ComfyUI maps, for layers 0-31 of each encoder.
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}
# The kohya prefixes model_lora_keys_clip maps per CLIP encoder of each family: a model with one CLIP
# (SD 1.x: clip_l, SD 2.x: clip_h, Flux: clip_l beside T5) takes lora_te_ and lora_te1_; with clip_l and
# clip_g (SDXL, SD3) lora_te1_ is clip_l and lora_te2_ clip_g.
CLIP_PREFIXES = {"StableDiffusionPipeline": {"text_encoder": ("lora_te", "lora_te1")},
                 "FluxPipeline": {"text_encoder": ("lora_te", "lora_te1")},
                 "StableDiffusionXLPipeline": {"text_encoder": ("lora_te1",), "text_encoder_2": ("lora_te2",)},
                 "StableDiffusion3Pipeline": {"text_encoder": ("lora_te1",), "text_encoder_2": ("lora_te2",)}}


def accepted_clip_names(pipeline_class: str) -> dict[str, str]:
    """LoRA name in the file -> "<text encoder attr>.text_model.<layer path>"."""
    names = {}
    for attr, prefixes in CLIP_PREFIXES[pipeline_class].items():
        for prefix in prefixes:
            for b in range(32):
                for layer, lora_name in LORA_CLIP_MAP.items():
                    names[f"{prefix}_text_model_encoder_layers_{b}_{lora_name}"] = f"{attr}.text_model.encoder.layers.{b}.{layer}"
    return names


LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def load_lycoris(lora: dict[str, torch.Tensor], accepted: dict[str, str]):
    """As LoKrAdapter.load / LoHaAdapter.load: (module -> (kind, parts, alpha or None), keys left unloaded)."""
    patches, loaded = {}, set()
    for name, module in accepted.items():
        for kind, names in (("lokr", LOKR_PARTS), ("loha", LOHA_PARTS)):
            parts = {p: lora[f"{name}.{p}"] for p in names if f"{name}.{p}" in lora}
            if parts:
                alpha = lora[name + ".alpha"].item() if name + ".alpha" in lora else None
                patches[module] = (kind, parts, alpha)
                loaded |= {f"{name}.{p}" for p in parts} | ({name + ".alpha"} if alpha is not None else set())
    return patches, sorted(set(lora) - loaded)


def lycoris_delta(kind: str, parts: dict[str, torch.Tensor], alpha: float | None, shape: torch.Size) -> torch.Tensor:
    """calculate_weight of LoKr (kron(w1, w2), alpha / rank only when a factor is decomposed) and LoHa
    ((w1a w1b) * (w2a w2b) * alpha / rank)."""
    p = {k: v.double() for k, v in parts.items()}
    if kind == "loha":
        scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (scale * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(shape)
    dim = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"]
    else:
        dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    else:
        dim, w2 = p["lokr_w2_b"].shape[0], p["lokr_w2_a"] @ p["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (scale * torch.kron(w1, w2)).reshape(shape)
