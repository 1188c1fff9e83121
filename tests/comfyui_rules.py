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
- DoRA (comfy/lora.py `load_lora` reads `<name>.dora_scale` beside any adapter;
  comfy/weight_adapter/lora.py hands it to comfy/weight_adapter/base.py `weight_decompose`):
  weight_calc = W + scale * delta; a dora_scale whose first axis is the weight's output axis
  (`wd_on_output_axis`) divides by the norm of the base W's rows, any other by the norm of
  weight_calc's input columns; eps of the weight's dtype is added; weight_calc *= dora_scale / norm;
  at strength s != 1 the result is W + s (weight_calc - W).

Coverage of the UNet map: what `unet_to_diffusers` lists for each down/mid/up block (resnets:
conv1, conv2, time_emb_proj, conv_shortcut; attentions: proj_in, proj_out and, per transformer
block, attn1/attn2 to_q/to_k/to_v/to_out.0 and ff.net.0.proj/ff.net.2; down/upsampler convs) and
its basic entries (conv_in, conv_out, time_embedding, add_embedding, class_embedding). ComfyUI
derives its UNet config (res blocks and transformer depth per block) from the checkpoint; here it
is derived from the diffusers UNet's config, which describes the same structure. Norm weights are
left out: a LoRA never targets them. The SD3/Flux maps list the linear layers ComfyUI maps (it
also maps norms and q/k norms, which no LoRA targets).

Issue 22's families: Chroma is `model_base.Chroma(Flux)` in ComfyUI, so it takes the Flux branch
(`flux_to_diffusers`, of which Chroma's diffusers transformer has the attention and feed-forward
layers); Z-Image is `model_base.Lumina2`, mapped by `utils.z_image_to_diffusers` (diffusers' separate
to_q/to_k/to_v onto slices of the fused qkv, refiners, x/cap/t embedders, final layer) under
`transformer.<name>`; Qwen-Image's ComfyUI model keeps diffusers' module names, and its branch
accepts `transformer.<name>` (and the bare name) for every weight of the model.
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


def z_image_module_names(config: dict[str, Any]) -> set[str]:
    """diffusers Z-Image transformer module names that z_image_to_diffusers maps (the context
    refiner blocks have no adaLN modulation)."""
    attention = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    names = {f"layers.{i}.{p}" for i in range(config["n_layers"]) for p in (*attention, "adaLN_modulation.0")}
    names |= {f"noise_refiner.{i}.{p}" for i in range(config["n_refiner_layers"])
              for p in (*attention, "adaLN_modulation.0")}
    names |= {f"context_refiner.{i}.{p}" for i in range(config["n_refiner_layers"]) for p in attention}
    return names | {"all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1",
                    "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"}


def qwen_image_module_names(config: dict[str, Any]) -> set[str]:
    """Qwen-Image's linear layers, which ComfyUI names as diffusers does."""
    per_block = ("img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mlp.net.0.proj", "txt_mlp.net.2")
    names = {f"transformer_blocks.{i}.{p}" for i in range(config["num_layers"]) for p in per_block}
    return names | {"img_in", "txt_in", "norm_out.linear", "proj_out",
                    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"}


COMFY_TRANSFORMER_MAPS = {"flux": flux_module_names, "sd3": mmdit_module_names, "z_image": z_image_module_names,
                          "qwen_image": qwen_image_module_names}


def accepted_lora_names(family_form: str, denoiser_config: dict[str, Any], is_flux: bool = False,
                        architecture: str | None = None) -> dict[str, str]:
    """LoRA name in the file -> diffusers module name, as model_lora_keys_unet accepts them.
    `architecture` ("flux" for Flux and Chroma, "sd3", "z_image", "qwen_image") picks the
    transformer's map; without it, is_flux chooses between Flux and SD3."""
    if family_form == "kohya":
        return {"lora_unet_" + name.replace(".", "_"): name for name in unet_module_map(denoiser_config)}
    names = COMFY_TRANSFORMER_MAPS[architecture or ("flux" if is_flux else "sd3")](denoiser_config)
    return {f"transformer.{name}": name for name in names}


def load_lora(lora: dict[str, torch.Tensor], accepted: dict[str, str]):
    """(patches: module -> (up, down, alpha or None), keys ComfyUI would leave unloaded)."""
    patches, unloaded = load_dora(lora, accepted)
    return {module: patch[:3] for module, patch in patches.items()}, unloaded


def load_dora(lora: dict[str, torch.Tensor], accepted: dict[str, str]):
    """As load_lora, with each module's `.dora_scale` (or None): module -> (up, down, alpha, dora_scale)."""
    patches, loaded = {}, set()
    for name, module in accepted.items():
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if name + up in lora:
                alpha = lora[name + ".alpha"].item() if name + ".alpha" in lora else None
                patches[module] = (lora[name + up], lora[name + down], alpha, lora.get(name + ".dora_scale"))
                loaded |= {name + up, name + down} | {name + k for k in (".alpha", ".dora_scale") if name + k in lora}
                break
    return patches, sorted(set(lora) - loaded)


def weight_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None, shape: torch.Size) -> torch.Tensor:
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return (scale * (up.flatten(1).double() @ down.flatten(1).double())).reshape(shape)


# FLUX.2: ComfyUI runs the BFL checkpoint's own modules and accepts a LoRA for any module of its state
# dict by the generic name `diffusion_model.<module>` (model_lora_keys_unet's first loop); its
# diffusers-name map (flux_to_diffusers) is FLUX.1's. The BFL modules, with the diffusers layers each
# holds, as diffusers' single-file converter (convert_flux2_transformer_checkpoint_to_diffusers)
# splits them: (diffusers module, which third of a fused qkv or None, halves swapped).
FLUX2_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
                "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
                "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
FLUX2_OTHER = {"img_in": "x_embedder", "txt_in": "context_embedder",
               "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
               "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
               "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
               "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
               "single_stream_modulation.lin": "single_stream_modulation.linear",
               "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
FLUX2_GUIDANCE = {"guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
                  "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2"}


def flux2_lora_names(config: dict[str, Any]) -> dict[str, list[tuple[str, int | None, bool]]]:
    """LoRA name in the file -> the diffusers layers of that BFL module."""
    names: dict[str, list[tuple[str, int | None, bool]]] = {}
    for i in range(config["num_layers"]):
        for bfl, parts in FLUX2_DOUBLE.items():
            names[f"diffusion_model.double_blocks.{i}.{bfl}"] = [
                (f"transformer_blocks.{i}.{p}", k if len(parts) == 3 else None, False) for k, p in enumerate(parts)]
    for i in range(config["num_single_layers"]):
        for bfl, diffusers in FLUX2_SINGLE.items():
            names[f"diffusion_model.single_blocks.{i}.{bfl}"] = [
                (f"single_transformer_blocks.{i}.{diffusers}", None, False)]
    other = {**FLUX2_OTHER, **(FLUX2_GUIDANCE if config.get("guidance_embeds", True) else {})}
    for bfl, diffusers in other.items():
        names[f"diffusion_model.{bfl}"] = [(diffusers, None, bfl == "final_layer.adaLN_modulation.1")]
    return names


def load_flux2_lora(lora: dict[str, torch.Tensor], accepted: dict[str, list[tuple[str, int | None, bool]]]):
    """As load_lora, with each BFL patch (delta = up @ down on the BFL weight) read back per diffusers
    layer: the rows of its third of a fused qkv, or the halves put back in diffusers' order."""
    patches, loaded = {}, set()
    for name, layers in accepted.items():
        if name + ".lora_B.weight" not in lora:
            continue
        up, down = lora[name + ".lora_B.weight"], lora[name + ".lora_A.weight"]
        alpha = lora[name + ".alpha"].item() if name + ".alpha" in lora else None
        loaded |= {name + ".lora_B.weight", name + ".lora_A.weight"}
        loaded |= {name + ".alpha"} if alpha is not None else set()
        for module, third, swapped in layers:
            rows = up
            if third is not None:
                rows = up.chunk(3, dim=0)[third]
            if swapped:  # BFL (shift, scale) -> diffusers (scale, shift)
                shift, scale = up.chunk(2, dim=0)
                rows = torch.cat([scale, shift])
            patches[module] = (rows, down, alpha)
    return patches, sorted(set(lora) - loaded)


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


def dora_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
                dora_scale: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The patched weight of LoRAAdapter.calculate_weight with a dora_scale (weight_decompose), in float64."""
    base = weight.double()
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    calc = base + scale * (up.flatten(1).double() @ down.flatten(1).double()).reshape(base.shape)
    ones = [1] * (base.dim() - 1)
    if dora_scale.shape[0] == base.shape[0]:
        norm = base.reshape(base.shape[0], -1).norm(dim=1, keepdim=True).reshape(base.shape[0], *ones)
    else:
        norm = calc.transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            base.shape[1], *ones).transpose(0, 1)
    calc = calc * (dora_scale.double() / (norm + torch.finfo(weight.dtype).eps))
    return calc if strength == 1.0 else base + strength * (calc - base)
