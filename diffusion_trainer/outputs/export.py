"""The adapter as one file in the form ComfyUI, AUTOMATIC1111/Forge and civitai read.

The diffusers file (pytorch_lora_weights.safetensors) keeps alpha only in its header, which those
tools ignore, and names SD/SDXL modules in a way they do not map. Beside it goes
`<adaptor_name>.safetensors`, in the form the family's loaders expect (ModelFamily.single_file_form):

- "kohya" (SD 1.x/2.x, SDXL): `lora_unet_<module path, '.' as '_'>.lora_down.weight`,
  `.lora_up.weight` and an `.alpha` tensor, as diffusers' own converters write them, with alpha set
  to the trained value (the converter writes alpha = rank, i.e. scale 1).
- "folded" (SD3, Flux): `transformer.<module path>.lora_A.weight` / `.lora_B.weight` with the LoRA
  scale multiplied into lora_B: ComfyUI applies no scale without an `.alpha` tensor, and diffusers
  refuses a file holding both `.alpha` tensors and its own adapter metadata.
- "bfl" (FLUX.2): `diffusion_model.<BFL module>.lora_A/lora_B.weight`, scale folded in, as
  ComfyUI names FLUX.2's modules (bfl_keys).

LoKr and LoHa keep their LyCORIS keys; DoRA adds `<name>.dora_scale` to its LoRA, computed from the
base weights (see dora.py), so a DoRA file is written only where the base model is at hand.

The header carries kohya's ss_* training fields and Stability AI's ModelSpec fields. The same
code serves `python main.py export <adapter_dir>` for folders written by earlier versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import atomic
from ..errors import InputError
from ..lora import loaders, single_file_written
from .dora import base_weight, comfy_dora_scale
from .layout import INFO_NAME, WEIGHTS_NAME, single_file_name

EXIT_OK, EXIT_BAD_INPUT = 0, 2
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the PEFT config


# --- the weights ---------------------------------------------------------------------------

def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: alpha / rank, or alpha / sqrt(rank) for rank-stabilised LoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def peft_config(header: dict[str, str], info: dict[str, Any] | None) -> dict[str, Any]:
    """The adapter's LoRA config: from the diffusers header (keys "<prefix>.lora_alpha" …), else
    from tlab_adaptor_info.json."""
    config = {}
    if header.get(DIFFUSERS_METADATA_KEY):
        config = {key.split(".", 1)[-1]: value for key, value in json.loads(header[DIFFUSERS_METADATA_KEY]).items()}
    if config.get("lora_alpha") is None and info:
        config = {**config, **info.get("lora_config", {})}
    if config.get("lora_alpha") is None or config.get("r") is None:
        raise InputError("the adapter records no LoRA rank/alpha: neither its safetensors header nor "
                         f"{INFO_NAME} has them.")
    return config


def to_kohya(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers SD/SDXL LoRA in kohya's keys, alpha as trained."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state_dict))
    for key, down in list(kohya.items()):
        if key.endswith(".lora_down.weight"):
            rank = down.shape[0]
            alpha = lora_scale(float(config["lora_alpha"]), rank, bool(config.get("use_rslora"))) * rank
            kohya[key.removesuffix(".lora_down.weight") + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return {key: tensor.contiguous() for key, tensor in kohya.items()}


def to_folded(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers SD3/Flux LoRA (already transformer.*.lora_A/lora_B) with the scale in lora_B."""
    folded = {}
    for key, tensor in state_dict.items():
        if key.endswith(".lora_B.weight"):
            tensor = tensor * lora_scale(float(config["lora_alpha"]), tensor.shape[1], bool(config.get("use_rslora")))
        elif not key.endswith(".lora_A.weight"):
            raise InputError(f"unexpected key '{key}' in the diffusers adapter: expected lora_A/lora_B weights.")
        folded[key] = tensor.contiguous()
    return folded


def to_bfl(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX.2 LoRA in BFL's module names (see bfl_keys), the scale in lora_B."""
    from .bfl_keys import to_bfl_lora

    folded = to_folded(state_dict, config)
    modules = {key.removeprefix("transformer.").removesuffix(".lora_A.weight")
               for key in folded if key.endswith(".lora_A.weight")}
    return to_bfl_lora({m: (folded[f"transformer.{m}.lora_A.weight"], folded[f"transformer.{m}.lora_B.weight"])
                        for m in sorted(modules)})


FORMS = {"kohya": to_kohya, "folded": to_folded, "bfl": to_bfl}

# The weights of each LyCORIS type, as peft names them and ComfyUI's weight adapters read them.
LYCORIS_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                 "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LORA_PARTS = ("lora_A.weight", "lora_B.weight")
MAGNITUDE = "lora_magnitude_vector"  # peft's DoRA magnitude


def split_components(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """component ("unet", "transformer", "text_encoder"…) -> module path -> part -> tensor."""
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        component, rest = key.split(".", 1)
        part = next((p for p in LORA_PARTS + LYCORIS_PARTS + (MAGNITUDE,) if rest.endswith("." + p)), None)
        if rest.endswith(f".{MAGNITUDE}.weight"):  # a text encoder's, named as transformers loads it
            rest, part = rest.removesuffix(".weight"), MAGNITUDE
        if part is None:
            raise InputError(f"unexpected key '{key}' in the diffusers adapter: not a LoRA, DoRA, LoKr or LoHa weight.")
        out.setdefault(component, {}).setdefault(rest[:-len(part) - 1], {})[part] = tensor
    return out


def module_weights(name: str, parts: dict[str, torch.Tensor], config: dict[str, Any], kohya: bool,
                   base: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One module's adapter under `name`, at the trained strength: kohya's lora_down/lora_up + alpha
    (kohya=True) or lora_A/lora_B with the scale folded into lora_B; DoRA as that LoRA plus the
    dora_scale for the `base` weight; LoKr with the scale folded into lokr_w1 (ComfyUI then applies
    1.0); LoHa with its alpha (ComfyUI applies alpha / rank)."""
    alpha, use_rslora = float(config.get("lora_alpha", config.get("alpha"))), bool(config.get("use_rslora"))
    if MAGNITUDE in parts:
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        delta = lora_scale(alpha, down.shape[0], use_rslora) * (up.flatten(1).double() @ down.flatten(1).double())
        return {**module_weights(name, {p: parts[p] for p in LORA_PARTS}, config, kohya),
                f"{name}.dora_scale": comfy_dora_scale(base, delta, parts[MAGNITUDE])}
    if "lora_A.weight" in parts:
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        scale = lora_scale(alpha, down.shape[0], use_rslora)
        if kohya:
            return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(scale * down.shape[0], dtype=torch.float32)}
        return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * scale}
    if "hada_w1_a" in parts:
        rank = parts["hada_w1_b"].shape[0]
        return {**{f"{name}.{p}": t for p, t in parts.items()},
                f"{name}.alpha": torch.tensor(lora_scale(alpha, rank) * rank, dtype=torch.float32)}
    rank = int(config["r"])
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    rest = {f"{name}.{p}": t for p, t in parts.items() if not p.startswith("lokr_w1")}
    return {f"{name}.lokr_w1": w1 * lora_scale(alpha, rank), **rest}


def to_single_file(state_dict: dict[str, torch.Tensor], config: dict[str, Any], family_cls: Any,
                   base_modules: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Any adapter folder's weights (denoiser and text encoders, LoRA, DoRA, LoKr or LoHa) in the
    single file's names: the denoiser as the family's form names it, each text encoder with its kohya
    prefix. A DoRA adapter needs `base_modules`: per component ("unet", "text_encoder"...) the model
    its base weights are read from."""
    prefix = family_cls.lora_save_prefix + "."
    kohya = family_cls.single_file_form == "kohya"
    dora = any(f".{MAGNITUDE}" in k for k in state_dict)
    if dora and base_modules is None:
        raise InputError("a DoRA adapter's single file needs the base model's weights (its dora_scale depends on "
                         "them), and they were not loaded.")

    def base(component: str, module: str) -> torch.Tensor | None:
        return base_weight(base_modules[component], module) if dora else None

    denoiser = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not any(".lokr_" in k or ".hada_" in k or f".{MAGNITUDE}" in k for k in denoiser):
        # diffusers' own converters name every UNet module as ComfyUI maps it
        return {**FORMS[family_cls.single_file_form](denoiser, config),
                **text_encoder_weights(state_dict, config, family_cls, base)}
    modules = split_components(denoiser).get(prefix[:-1], {})
    if dora and family_cls.single_file_form == "bfl":
        from .bfl_keys import to_bfl_lora

        folded = {m: module_weights("m", parts, config, False, base(prefix[:-1], m)) for m, parts in modules.items()}
        tensors = to_bfl_lora({m: (w["m.lora_A.weight"], w["m.lora_B.weight"]) for m, w in folded.items()},
                              {m: w["m.dora_scale"] for m, w in folded.items()})
    else:
        tensors = {}
        for module, parts in modules.items():
            name = f"lora_unet_{module.replace('.', '_')}" if kohya else f"transformer.{module}"
            tensors.update(module_weights(name, parts, config, kohya, base(prefix[:-1], module)))
    tensors.update(text_encoder_weights(state_dict, config, family_cls, base))
    return {key: tensor.contiguous() for key, tensor in tensors.items()}


def text_encoder_weights(state_dict: dict[str, torch.Tensor], config: dict[str, Any], family_cls: Any,
                         base: Any) -> dict[str, torch.Tensor]:
    """The text encoders' adapters under their kohya prefixes (base(component, module): the base
    weight a DoRA module needs)."""
    tensors = {}
    own = family_cls.lora_save_prefix + "."
    components = split_components({k: v for k, v in state_dict.items() if not k.startswith(own)})
    for component, modules in components.items():
        prefix = family_cls.single_file_text_prefixes.get(component)
        if prefix is None:
            raise InputError(f"the adapter holds weights for '{component}', which {family_cls.label} has no "
                             "single-file name for.")
        for module, parts in modules.items():
            # transformers 5 names CLIP's layers without the checkpoints' "text_model." (ComfyUI keeps it)
            name = module if module.startswith("text_model.") else f"text_model.{module}"
            tensors.update(module_weights(f"{prefix}_{name.replace('.', '_')}", parts, config, kohya=True,
                                          base=base(component, module)))
    return {key: tensor.contiguous() for key, tensor in tensors.items()}


# --- the header -----------------------------------------------------------------------------

def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ss_tag_frequency for one dataset: comma-separated tags counted over the captions."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip() for tag in caption.split(",") if tag.strip())
    return dict(counts.most_common())


def dataset_label(dataset_name: str) -> str:
    return Path(dataset_name).name or dataset_name


def single_file_metadata(family_cls: Any, info: dict[str, Any], name: str, config: dict[str, Any],
                         denoiser_config: dict[str, Any], captions: list[str] | None) -> dict[str, str]:
    params = info.get("parameters") or {}
    kind = (info.get("lora_config") or {}).get("lora_type", "lora")
    meta = {
        "ss_network_module": "lycoris.kohya" if kind in ("lokr", "loha", "dora") else "networks.lora",
        "ss_network_dim": str(config["r"]),
        "ss_network_alpha": f"{float(config['lora_alpha']):g}",
        "ss_output_name": name,
        "ss_steps": str(info.get("steps_trained", 0)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": name,
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **family_cls.base_model_metadata(denoiser_config, info.get("prediction_type")),
    }
    if kind in ("lokr", "loha", "dora"):  # LyCORIS's record of the algorithm, as its kohya trainers write it
        meta["ss_network_args"] = json.dumps({"algo": kind} if kind != "dora" else
                                             {"algo": "lora", "dora_wd": True, "wd_on_output": True})
    if params.get("resolution"):
        size = int(params["resolution"])
        meta["ss_resolution"] = f"({size}, {size})"
        meta["modelspec.resolution"] = f"{size}x{size}"
    if info.get("trigger_word"):
        meta["modelspec.trigger_phrase"] = info["trigger_word"]
    if captions is not None:
        meta["ss_num_train_images"] = str(len(captions))
        label = dataset_label(str(params.get("dataset_name", "dataset")))
        meta["ss_tag_frequency"] = json.dumps({label: tag_frequency(captions)})
    return meta


# --- writing ------------------------------------------------------------------------------

def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    return atomic.write_file(path, lambda partial: save_file(tensors, str(partial), metadata=metadata))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def write_single_file(directory: Path, name: str, family_cls: Any, info: dict[str, Any],
                      denoiser_config: dict[str, Any], captions: list[str] | None,
                      output: Path | None = None, base_modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Convert the folder's diffusers file into the single file; returns its path. `base_modules`:
    see to_single_file (DoRA only)."""
    state_dict, header = read_safetensors(Path(directory) / WEIGHTS_NAME)
    config = peft_config(header, info)
    if family_cls.converts_lora_keys:
        state_dict = peft_names(state_dict, family_cls.lora_save_prefix + ".")
    tensors = to_single_file(state_dict, config, family_cls, base_modules)
    metadata = single_file_metadata(family_cls, info, name, config, denoiser_config, captions)
    return save_atomically(tensors, output or Path(directory) / single_file_name(name), metadata)


def peft_names(state_dict: dict[str, torch.Tensor], own: str) -> dict[str, torch.Tensor]:
    """diffusers' LoRA names (lora.down/up, lora_linear_layer...) back to PEFT's (module path +
    lora_A/lora_B) for the text encoders, and for a DoRA denoiser (a plain LoRA denoiser keeps them:
    diffusers' kohya converter reads them). Each part on its own: the converter guesses one naming."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    dora = any(f".{MAGNITUDE}" in k for k in state_dict)
    parts = ({k: v for k, v in state_dict.items() if k.startswith(own)},
             {k: v for k, v in state_dict.items() if not k.startswith(own)})
    out = {}
    for converts, part in zip((dora, True), parts):
        plain = any(".lora" in k and "lora_A" not in k and "lora_B" not in k and f".{MAGNITUDE}" not in k for k in part)
        out.update(convert_all_state_dict_to_peft(part) if converts and plain else part)
    return out


# --- `python main.py export` -----------------------------------------------------------------

def read_adapter_folder(directory: Path) -> dict[str, Any]:
    """tlab_adaptor_info.json of an adapter folder, or a clear error saying what is missing."""
    if not directory.is_dir():
        raise InputError(f"adapter_dir: there is no folder '{directory}'.")
    missing = [n for n in (WEIGHTS_NAME, INFO_NAME) if not (directory / n).is_file()]
    if missing:
        raise InputError(f"adapter_dir: '{directory}' is not an adapter folder made by this trainer: it has no "
                         f"{' and no '.join(missing)}.")
    try:
        info = json.loads((directory / INFO_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"adapter_dir: {directory / INFO_NAME} is not readable JSON ({exc}).") from None
    if not isinstance(info, dict):
        raise InputError(f"adapter_dir: {directory / INFO_NAME} must hold a JSON object.")
    return info


def family_from_info(info: dict[str, Any]) -> Any:
    from ..families import FAMILIES

    architecture = info.get("model_architecture")
    if architecture not in FAMILIES:
        raise InputError(f"adapter_dir: {INFO_NAME} names model_architecture '{architecture}'; this trainer "
                         f"exports {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[architecture]


def denoiser_config_for(info: dict[str, Any], family_cls: Any, directory: Path) -> dict[str, Any]:
    """The base model's denoiser config.json (local folder or hub cache); without it, what the LoRA
    itself shows: the cross-attention width (the text encoder's), from attn2.to_k's input."""
    base = str(info.get("base_model") or "")
    try:
        if not base:
            raise FileNotFoundError
        path = Path(base).expanduser() / family_cls.denoiser_attr / "config.json"
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base, "config.json", subfolder=family_cls.denoiser_attr))
        return json.loads(path.read_text())
    except Exception:  # no base model here: offline, moved, or gated
        pass
    state_dict, _ = read_safetensors(directory / WEIGHTS_NAME)
    for key, tensor in state_dict.items():
        if "attn2.to_k." in key and (".lora_A." in key or ".lora.down." in key):
            return {"cross_attention_dim": tensor.shape[1]}
    return {}


def training_captions(params: dict[str, Any]) -> list[str] | None:
    """The run's captions (trigger word in), if its dataset is a local folder or file still here
    (a hub dataset is not downloaded again just to count tags)."""
    from ..data.captions import caption_text, with_trigger
    from ..data.sources import load_records

    if not Path(str(params.get("dataset_name", ""))).expanduser().exists():
        return None
    try:
        outputs = (Path(str(params["output_dir"])),) if params.get("output_dir") else ()
        records = load_records(params["dataset_name"], params["image_column"], params["caption_column"],
                               skip_folders=outputs, caption_extension=params.get("caption_extension", ".txt"),
                               default_caption=params.get("default_caption", ""),
                               trigger_word=params.get("trigger_word", ""))
        column = records[params["caption_column"]]
        return [with_trigger(caption_text(c), params.get("trigger_word", "")) for c in column]
    except Exception:
        return None


def rewrite_diffusers(directory: Path, info: dict[str, Any], family_cls: Any, output: Path) -> Path:
    """The diffusers file, its PEFT config (alpha) in the header as diffusers reads it."""
    state_dict, header = read_safetensors(directory / WEIGHTS_NAME)
    if not header.get(DIFFUSERS_METADATA_KEY):
        config = peft_config(header, info)
        header[DIFFUSERS_METADATA_KEY] = json.dumps(
            {f"{family_cls.lora_save_prefix}.{key}": value for key, value in config.items()}, sort_keys=True)
        header.setdefault("format", "pt")
    return save_atomically(state_dict, output, header)


def export_adapter(directory: Path, form: str = "kohya", output: Path | None = None) -> tuple[Path, list[str]]:
    """Write the adapter folder's LoRA in `form`; returns the file and notes for the user."""
    directory = Path(directory).expanduser()
    info = read_adapter_folder(directory)
    family_cls = family_from_info(info)
    check_readable(directory / WEIGHTS_NAME)
    params = info.get("parameters") or {}
    name = str(params.get("adaptor_name") or directory.name)
    label = "--output" if output else "adapter_dir"
    target = writable_target(Path(output).expanduser() if output else
                             directory / (WEIGHTS_NAME if form == "diffusers" else single_file_name(name)), label)
    if form == "diffusers":
        return written(label, target, lambda: rewrite_diffusers(directory, info, family_cls, target)), []
    kind = (info.get("lora_config") or {}).get("lora_type", "lora")
    if not single_file_written(kind, family_cls.single_file_form):
        raise InputError(f"adapter_dir: {directory} is a {kind} adapter of {family_cls.label}: "
                         f"{loaders(kind, family_cls.single_file_form)['ComfyUI (the single file)'].removeprefix('no: ')}.")
    notes = []
    captions = training_captions(params)
    if captions is None:
        notes.append(f"the training dataset '{params.get('dataset_name')}' is not a folder here, so "
                     "ss_tag_frequency and ss_num_train_images are left out.")
    bases = dora_base_modules(directory, info, family_cls)
    if bases is not None:
        notes.append(f"DoRA: the dora_scale was computed from the base model '{info.get('base_model')}'.")
    try:
        path = written(label, target, lambda: write_single_file(
            directory, name, family_cls, info, denoiser_config_for(info, family_cls, directory), captions, target,
            bases))
    except InputError:
        raise
    except Exception as exc:  # weights that are not this family's LoRA
        raise InputError(f"adapter_dir: {directory / WEIGHTS_NAME} could not be converted for "
                         f"{family_cls.label} ({type(exc).__name__}: {exc}).") from None
    return path, notes


def dora_base_modules(directory: Path, info: dict[str, Any], family_cls: Any) -> dict[str, torch.nn.Module] | None:
    """For a DoRA folder, the base model's denoiser and text encoders (its dora_scale depends on their
    weights), loaded in the run's weight dtype; None for the other types."""
    state_dict, _ = read_safetensors(directory / WEIGHTS_NAME)
    if not any(f".{MAGNITUDE}" in k for k in state_dict):
        return None
    base = str(info.get("base_model") or "")
    precision = str((info.get("parameters") or {}).get("mixed_precision"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    try:
        if not base:
            raise InputError(f"{INFO_NAME} names no base_model")
        family = family_cls.load(base, dtype)
    except InputError as exc:
        raise InputError(f"adapter_dir: a DoRA adapter's single file needs its base model's weights, which could "
                         f"not be loaded ({exc}).") from None
    return {family_cls.lora_save_prefix: family.denoiser,
            **{attr: getattr(family.pipeline, attr) for attr in family_cls.trainable_text_attrs
               if getattr(family.pipeline, attr, None) is not None}}


def check_readable(path: Path) -> None:
    """Every tensor of a safetensors file can be read, or an error naming the file."""
    try:
        read_safetensors(path)
    except Exception as exc:  # safetensors' own error for a bad header or a short file, or an OSError
        raise InputError(f"adapter_dir: {path} is damaged or not a safetensors file ({exc}).") from None


def writable_target(path: Path, label: str) -> Path:
    if path.is_dir():
        raise InputError(f"{label}: '{path}' is a folder; give the file to write, e.g. "
                         f"'{path / 'my_lora.safetensors'}'.")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{label}: '{path}' cannot be written (it is read-only).")
    return path


def written(label: str, target: Path, write: Any) -> Path:
    """write(), with a failed write (a read-only or full disk) said as such."""
    from safetensors import SafetensorError

    try:
        return write()
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own type
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"{label}: '{target}' cannot be written ({reason}).") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="main.py export", description="Write an adapter folder's LoRA in another form.")
    parser.add_argument("adapter_dir", type=Path, help="a folder with pytorch_lora_weights.safetensors and "
                        f"{INFO_NAME}, as this trainer writes")
    parser.add_argument("--format", choices=("kohya", "diffusers"), default="kohya",
                        help="kohya (default): <adaptor_name>.safetensors for ComfyUI, AUTOMATIC1111/Forge and "
                        "civitai; diffusers: pytorch_lora_weights.safetensors with alpha in its header")
    parser.add_argument("--output", type=Path, help="the file to write (default: inside adapter_dir)")
    args = parser.parse_args(argv)
    try:
        path, notes = export_adapter(args.adapter_dir, args.format, args.output)
    except InputError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in notes:
        print(f"Note: {note}", file=sys.stderr)
    print(f"Wrote {path}")
    return EXIT_OK
