"""The memory plan: before any weight is read, what each stage of a run puts on the GPU and the
peak it reaches, against the GPU's free memory; with `auto` settings, the least lossy settings
that fit. Weights are counted on meta-device models built from the config files; activations
come from each family's cost (families/base.py), fitted to fake-tensor simulations of this
trainer's own step (memory/simulate.py, bench/memory_simulation.py).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from .components import Component, Weights, pipeline_components
from .offload import RESIDENT
from .storage import PLAIN, resolve_storage

GB = 1e9
# Least lossy first (issue 19): storage of the frozen base, then offloading its blocks.
STORAGE_ORDER = ("fp32", "bf16", "fp8", "int8", "nf4")
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
# torchao's int8 and bitsandbytes' nf4 linears return their input's dtype, which after CUDA's fp32
# norms is fp32 where autocast's bf16 linears return bf16: a block's activations and its residual
# stream grow by about this factor (fitted to memory/simulate.py's steps of the five real-size models)
WEIGHT_ONLY_ACTIVATIONS = {"int8": 1.4, "nf4": 1.5}  # with gradient checkpointing
WEIGHT_ONLY_ACTIVATIONS_UNCHECKPOINTED = {"int8": 1.0, "nf4": 1.2}
LORA_BYTES = 12  # fp32 weight and AdamW's two moments (gradients arrive as activations leave)
VAE_BYTES_PER_PIXEL = 1.6e9 / 1024**2  # encoding one 1024 px image: about 1.6 GB (bf16)
TILE = 512  # eval images decode in tiles of this size when a whole image does not fit
# Host RAM beside the weights: the Python process with torch, diffusers and CUDA's libraries, the
# data loader and small latent/text caches (an estimate, not measured on a GPU machine).
HOST_OVERHEAD_GB = 3.0


class DoesNotFit(InputError):
    """Explicit settings whose plan exceeds the GPU budget; the message names what to change."""


@dataclass(frozen=True)
class Settings:
    base_precision: str
    gradient_checkpointing: bool
    offload: str  # none or blocks

    def describe(self) -> str:
        return (f"base_precision={self.base_precision}, gradient_checkpointing="
                f"{'true' if self.gradient_checkpointing else 'false'}, offload={self.offload}")


@dataclass
class Stage:
    name: str
    on_device: dict[str, float]  # what, GB
    peak_gb: float
    host_gb: float = HOST_OVERHEAD_GB  # host RAM: what loads or is held there, and the overhead


TEXT_QUANTIZATION = {"int8": "int8 (torchao)", "nf4": "nf4 (bitsandbytes)"}  # as memory/storage.py applies them


@dataclass
class Plan:
    model: str
    budget_gb: float | None
    settings: Settings
    stages: list[Stage]
    notes: list[str] = field(default_factory=list)
    quantized_text_encoders: dict[str, str] = field(default_factory=dict)  # {name: int8 | nf4}, applied by the run
    host_budget_gb: float | None = None  # this machine's RAM (or --host-memory-gb); None: not checked

    @property
    def peak_gb(self) -> float:
        return max(stage.peak_gb for stage in self.stages)

    @property
    def host_ram_gb(self) -> float:
        return max(stage.host_gb for stage in self.stages)

    @property
    def fits(self) -> bool:
        return self.budget_gb is None or self.peak_gb <= self.budget_gb

    @property
    def fits_host(self) -> bool:
        return self.host_budget_gb is None or self.host_ram_gb <= self.host_budget_gb

    def lines(self) -> list[str]:
        budget = "no GPU budget" if self.budget_gb is None else f"{self.budget_gb:.1f} GB"
        out = [f"Memory plan for {self.model} ({budget}):"]
        for stage in self.stages:
            parts = ", ".join(f"{what} {gb:.2f}" for what, gb in stage.on_device.items())
            out.append(f"  {stage.name:<13} peak {stage.peak_gb:6.2f} GB: {parts} (host RAM {stage.host_gb:.1f} GB)")
        out.append(f"  settings: {self.settings.describe()}")
        out.append(f"  host RAM: peak {self.host_ram_gb:.1f} GB (what loads at once, "
                   f"{HOST_OVERHEAD_GB:.0f} GB for the process)"
                   + (f" of {self.host_budget_gb:.1f} GB" if self.host_budget_gb is not None else ""))
        out += [f"  {note}" for note in self.notes]
        if self.budget_gb is not None:
            out.append(f"fits: peak {self.peak_gb:.1f} GB of {self.budget_gb:.1f} GB" if self.fits else
                       f"does not fit: peak {self.peak_gb:.1f} GB of {self.budget_gb:.1f} GB")
        return out

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "peak_gb": round(self.peak_gb, 3), "budget_gb": self.budget_gb,
                "fits": self.fits, "settings": asdict(self.settings), "notes": self.notes,
                "host_budget_gb": self.host_budget_gb, "fits_host": self.fits_host,
                "quantized_text_encoders": dict(self.quantized_text_encoders), "host_ram_gb": round(self.host_ram_gb, 3),
                "stages": [{"name": s.name, "peak_gb": round(s.peak_gb, 3), "host_ram_gb": round(s.host_gb, 3),
                            "on_device": {k: round(v, 3) for k, v in s.on_device.items()}} for s in self.stages]}


@dataclass(frozen=True)
class Run:
    """The parameters a plan reads (explicit values, not the whole params object)."""

    resolution: int
    batch_size: int
    lora_rank: int
    lora_layers: str
    mixed_precision: str
    max_sequence_length: int = 77
    cache_text_embeddings: bool = True
    cache_latents: bool = True
    eval_images: bool = False
    train_text_encoder: bool = False  # the CLIP encoders train: they stay for the train step
    class_images: bool = False  # prior preservation draws class images: the whole base model at once

    @classmethod
    def of(cls, params: Any, class_images: bool | None = None) -> "Run":
        """`class_images`: whether class images will be drawn (None: whenever prior preservation has a
        class folder, as the plan command cannot know how many it lacks)."""
        if class_images is None:
            class_images = bool(params.class_data_dir.strip()) and params.prior_preservation
        captions_vary = params.shuffle_caption or params.caption_tag_dropout_rate > 0  # encoded as drawn
        return cls(params.resolution, params.train_batch_size, params.lora_r, params.lora_layers, params.mixed_precision,
                   params.max_sequence_length, params.cache_text_embeddings and not captions_vary,
                   params.cache_latents, bool(params.eval_prompt.strip()), params.train_text_encoder, class_images)


def storage_bytes(weights: Weights, precision: str) -> float:
    """Bytes of a component's weights stored in `precision`: fp8 keeps norms, embeddings and the
    layers diffusers' layerwise casting skips in bf16; int8 adds a bf16 scale per output row;
    nf4 an fp32 absmax per 64 weights (bitsandbytes without double quantization, diffusers' default)."""
    if precision in BYTES:
        return weights.total * BYTES[precision]
    if precision == "fp8":
        return weights.castable + (weights.total - weights.castable) * 2
    if precision == "int8":
        return weights.linear + weights.linear_rows * 2 + weights.other * 2
    if precision == "nf4":
        return weights.linear * (0.5 + 4 / 64) + weights.other * 2
    raise ValueError(f"unknown storage {precision!r}")


def lora_parameters(component: Component, targets: tuple[str, ...], rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on the linear layers whose names end with a target."""
    return sum(rank * (fan_in + fan_out) for name, fan_in, fan_out in component.weights.linears
               if any(name == t or name.endswith("." + t) for t in targets))


class Planner:
    """Everything a plan needs from the model, read once; `plan()` for one choice of settings."""

    def __init__(self, family_cls: Any, source: str, run: Run):
        self.family, self.run = family_cls, run
        wanted = (family_cls.denoiser_attr, "vae", *family_cls.text_encoder_attrs)
        self.components = pipeline_components(source, wanted)
        self.denoiser = self.components[family_cls.denoiser_attr]
        self.encoders = [self.components[a] for a in family_cls.text_encoder_attrs if a in self.components]
        self.vae = self.components["vae"]
        preset = run.lora_layers if run.lora_layers != "default" else family_cls.default_lora_layers
        targets = (tuple(name for name, _, _ in self.denoiser.weights.linears) if preset == "all-linear"
                   else family_cls.lora_presets[preset])
        self.lora = lora_parameters(self.denoiser, targets, run.lora_rank)
        self.model = f"{family_cls.label} ({source})"

    def with_run(self, run: Run) -> "Planner":
        """The same model read once, planned for other run parameters (the mixed_precision=bf16 note)."""
        other = copy.copy(self)
        other.run = run
        return other

    def compute(self, settings: Settings) -> str:
        """The dtype layers compute in, as the run sets it up (run/setup.py): mixed_precision's; with `no`
        fp32, every storage's layers upcast to it (no autocast)."""
        return {"no": "fp32", "fp16": "fp16"}.get(self.run.mixed_precision, "bf16")

    def plan(self, settings: Settings, budget_gb: float | None) -> Plan:
        run, compute = self.run, self.compute(settings)
        scale = BYTES[compute] / 2
        text_stage, quantized_text = self.encode_text_stage(compute, budget_gb)
        stages = [text_stage, self.encode_images_stage(compute)]
        weights = self.denoiser.weights
        base = storage_bytes(weights, settings.base_precision)
        on = {}
        if settings.offload == "blocks" and settings.gradient_checkpointing:
            streamed = weights.blocks_total * storage_bytes(weights, settings.base_precision) / weights.total
            last = weights.last_blocks * storage_bytes(weights, settings.base_precision) / weights.total
            resident = min(base, base - streamed + last)  # the rest, and the two blocks backward starts with
            on[f"{self.denoiser.name} {settings.base_precision} ({RESIDENT} blocks at a time)"] = resident / GB
        elif settings.offload == "blocks":  # backward needs every block's weights, which autograd keeps
            name = f"{self.denoiser.name} {settings.base_precision} (offload saves nothing without checkpointing)"
            on[name] = base / GB
        else:
            on[f"{self.denoiser.name} {settings.base_precision}"] = base / GB
        cast = resolve_storage(settings.base_precision, PLAIN[compute], PLAIN[compute]).casts_layers
        if cast or settings.base_precision == "int8":  # weights upcast for compute, kept for backward
            if cast:  # the cast layers; int8: every linear layer
                upcast = weights.checkpointed_castable if settings.gradient_checkpointing else weights.castable
            else:
                upcast = weights.checkpointed_linear if settings.gradient_checkpointing else weights.linear
            on["upcast weight copies"] = upcast * BYTES[compute] / GB
        on["LoRA + AdamW"] = self.lora * LORA_BYTES / GB
        tokens = self.family.prompt_tokens(run.max_sequence_length)
        activations = self.family.activation_bytes(self.denoiser.config, run.resolution, tokens,
                                                   settings.gradient_checkpointing) * run.batch_size * scale
        growth = WEIGHT_ONLY_ACTIVATIONS if settings.gradient_checkpointing else WEIGHT_ONLY_ACTIVATIONS_UNCHECKPOINTED
        activations *= growth.get(settings.base_precision, 1.0)
        on["activations" + (" (checkpointed)" if settings.gradient_checkpointing else "")] = activations / GB
        if not run.cache_latents:
            on[f"vae {compute}"] = storage_bytes(self.vae.weights, compute) / GB
        for encoder in self.staying_encoders():
            kept = quantized_text.get(encoder.name, compute)
            on[f"{encoder.name} {kept}"] = storage_bytes(encoder.weights, kept) / GB
        # host RAM: the denoiser as stored (each tensor quantized or cast as it is read: memory/cast_loading.py
        # for fp8), all of it pinned when its blocks are offloaded
        host = base / GB + HOST_OVERHEAD_GB
        stages.append(Stage("train step", on, sum(on.values()), host))
        if run.eval_images:
            stages.append(self.eval_stage(settings, on, compute, budget_gb))
            stages[-1].host_gb = host
        if run.class_images:
            stages.insert(1, self.class_images_stage(settings, on, compute))
            stages[1].host_gb = host
        notes = []
        if not run.cache_latents or not run.cache_text_embeddings:
            notes.append("without caches the encoders stay on the GPU during training")
        elif self.staying_encoders():
            notes.append(f"train_text_encoder: {', '.join(e.name for e in self.staying_encoders())} stay on the GPU "
                         "during training (trained, they encode every step)")
        if run.class_images:
            notes.append("prior preservation draws the class images class_data_dir lacks with the whole base "
                         "model: the denoiser loads before the text encoders are freed")
        if not (self.family.activation_fixed or self.family.activation_per_block):
            notes.append(f"{self.family.label}: activations are not modelled yet (no simulation fitted): "
                         "the train step counts weights, LoRA and optimizer only, so its real peak is higher")
        if quantized_text:
            stored = ", ".join(f"{name} in {TEXT_QUANTIZATION[bits]}" for name, bits in quantized_text.items())
            notes.append(f"{stored} to encode: {compute} would not fit beside the rest")
        return Plan(self.model, budget_gb, settings, stages, notes, quantized_text)

    def staying_encoders(self) -> list[Component]:
        """The text encoders on the GPU during training: all without a text cache, else the trained ones."""
        if not self.run.cache_text_embeddings:
            return self.encoders
        if self.run.train_text_encoder:
            trained = set(self.family.trainable_text_attrs)
            return [e for e in self.encoders if e.name in trained]
        return []

    def class_images_stage(self, settings: Settings, train: dict[str, float], compute: str) -> Stage:
        """Drawing class images: the base model whole (no LoRA), denoising and decoding one batch."""
        on = {k: v for k, v in train.items() if not k.startswith(("activations", "LoRA", "upcast"))}
        for encoder in self.encoders:
            on[f"{encoder.name} {compute}"] = storage_bytes(encoder.weights, compute) / GB
        on[f"vae {compute}"] = storage_bytes(self.vae.weights, compute) / GB
        eval_like = self.eval_stage(settings, train, compute, None).on_device
        on["denoising"] = eval_like["denoising"]
        on["decode"] = eval_like["decode"]
        return Stage("class images", on, sum(on.values()))

    def encode_text_stage(self, compute: str, budget_gb: float | None) -> tuple[Stage, dict[str, str]]:
        """Every text encoder and the VAE are on the GPU together (the run loads them at once, encodes
        the captions, eval prompts and held-out images, then frees the encoders); the largest frozen
        encoders are stored in 8 bits (torchao), then 4 (bitsandbytes nf4), as the run then stores them,
        while that does not fit. Returns the stage and {encoder: "int8" | "nf4"}."""
        precision = {e.name: compute for e in self.encoders}
        vae = storage_bytes(self.vae.weights, compute)
        working = 0.1 * GB * self.run.batch_size

        def total() -> float:
            return sum(storage_bytes(e.weights, precision[e.name]) for e in self.encoders) + vae + working

        trained = set(self.family.trainable_text_attrs) if self.run.train_text_encoder else set()
        frozen = [e for e in sorted(self.encoders, key=lambda e: -e.weights.total) if e.name not in trained]
        for bits in ("int8", "nf4"):  # 4 bits only for what 8 bits cannot fit (FLUX.2-dev's 24 B Mistral)
            for encoder in frozen:
                if budget_gb is None or total() / GB <= 0.9 * budget_gb:
                    break
                precision[encoder.name] = bits
        on = {f"{e.name} {precision[e.name]}": storage_bytes(e.weights, precision[e.name]) / GB for e in self.encoders}
        on[f"vae {compute}"] = vae / GB
        on["working memory"] = working / GB
        # host RAM: the encoders and the VAE load together, in the compute dtype (quantized after loading)
        host = (sum(storage_bytes(e.weights, compute) for e in self.encoders) + vae) / GB + HOST_OVERHEAD_GB
        stage = Stage("encode text", on, total() / GB, host)
        return stage, {n: p for n, p in precision.items() if p in ("int8", "nf4")}

    def encode_images_stage(self, compute: str) -> Stage:
        pixels = self.run.resolution ** 2 * self.run.batch_size
        on = {f"vae {compute}": storage_bytes(self.vae.weights, compute) / GB,
              f"{self.run.batch_size} image(s) at {self.run.resolution} px": pixels * VAE_BYTES_PER_PIXEL * BYTES[compute] / 2 / GB}
        host = storage_bytes(self.vae.weights, compute) / GB + HOST_OVERHEAD_GB
        return Stage("encode images", on, sum(on.values()), host)

    def eval_stage(self, settings: Settings, train: dict[str, float], compute: str, budget_gb: float | None) -> Stage:
        on = {k: v for k, v in train.items() if not k.startswith(("activations", "LoRA", "upcast"))}
        on["LoRA"] = self.lora * 4 / GB
        on[f"vae {compute}"] = storage_bytes(self.vae.weights, compute) / GB
        # denoising: no gradients, about one block's activations, twice for classifier-free guidance
        tokens = self.family.prompt_tokens(self.run.max_sequence_length)
        unit = self.family.activation_unit(self.denoiser.config, self.run.resolution, tokens)
        counts = self.family.block_counts(self.denoiser.config)
        one_block = max(self.family.largest_block_units(counts), self.family.activation_fixed_checkpointed)
        on["denoising"] = 2 * unit * one_block * BYTES[compute] / 2 / GB
        decode = 2 * self.run.resolution ** 2 * VAE_BYTES_PER_PIXEL * BYTES[compute] / 2 / GB
        name = "decode"
        if budget_gb is not None and sum(on.values()) + decode > budget_gb:
            decode, name = decode * TILE**2 / self.run.resolution**2, f"decode (tiled, {TILE} px)"
        on[name] = decode
        return Stage("eval image", on, sum(on.values()))

    def candidates(self, base_precision: str, offload: str, checkpointing: bool) -> list[Settings]:
        """The settings `auto` may choose, least lossy first."""
        if base_precision == "auto":
            start = {"no": "fp32", "fp16": "fp16"}.get(self.run.mixed_precision, "bf16")
            storages = [start] + [s for s in STORAGE_ORDER[2:] if s != start]
            if start == "fp32":
                storages.insert(1, "bf16")
        else:
            storages = [base_precision]
        # a UNet's few, large blocks hold units it checkpoints on their own (resnets, attention): the swap
        # brings a whole block for each, which the simulation does not cover, so auto offloads only
        # transformers' blocks (an explicit offload=blocks works on a UNet: memory/offload.py)
        unet = "UNet" in self.denoiser.class_name
        offloads = (["none"] if unet else ["none", "blocks"]) if offload == "auto" else [offload]
        found = []
        for off in offloads:
            for storage in storages:
                fixed = checkpointing or base_precision != "auto" and offload != "auto"
                gcs = [checkpointing] if fixed else [False, True]
                for gc in gcs if off == "none" else [True]:  # offload needs checkpointing (memory/offload.py)
                    if storage in ("fp8", "int8") and not gc and base_precision == "auto":
                        continue  # without checkpointing they keep an upcast copy of every weight
                    found.append(Settings(storage, gc, off))
        return found


def make_plan(family_cls: Any, source: str, run: Run, *, base_precision: str, offload: str,
              gradient_checkpointing: bool, budget_gb: float | None, host_budget_gb: float | None = None) -> Plan:
    """The plan for these settings; with auto ones, the first that fits the GPU and the host RAM (or, when
    none fits the host RAM, the first that fits the GPU; or the last tried). Raises DoesNotFit naming what
    to change when explicit settings do not fit the GPU; host RAM they exceed is a note (swap may serve)."""
    planner = Planner(family_cls, source, run)
    if budget_gb is None:  # no GPU: today's behaviour, mixed_precision decides the storage
        storage = base_precision if base_precision != "auto" else default_storage(run.mixed_precision)
        plan = planner.plan(Settings(storage, gradient_checkpointing, "none" if offload == "auto" else offload), None)
        plan.notes.append("no GPU here: no GPU budget; base_precision auto keeps mixed_precision's storage"
                          if base_precision == "auto" else "no GPU here: no GPU budget to check against")
        return with_host_budget(plan, host_budget_gb, [])
    options = planner.candidates(base_precision, offload, gradient_checkpointing)
    tried = [planner.plan(s, budget_gb) for s in options]
    for plan in tried:
        plan.host_budget_gb = host_budget_gb
    fitting = [plan for plan in tried if plan.fits]
    if fitting:
        chosen = next((plan for plan in fitting if plan.fits_host), fitting[0])
        if len(options) > 1:
            chosen.notes.append(choice_note(chosen, tried))
        elif not chosen.fits_host:  # explicit settings: name what auto could take instead
            fitting = [planner.plan(s, budget_gb) for s in planner.candidates("auto", "auto", gradient_checkpointing)]
            for plan in fitting:
                plan.host_budget_gb = host_budget_gb
            fitting = [plan for plan in fitting if plan.fits]
        with_host_budget(chosen, host_budget_gb, fitting)
        if run.mixed_precision == "no" and chosen.settings.base_precision != "fp32":
            half = planner.with_run(replace(run, mixed_precision="bf16")).plan(chosen.settings, budget_gb)
            chosen.notes.append(f"mixed_precision=no: every layer computes in fp32 (activations twice bf16's); "
                                f"mixed_precision=bf16 would need {half.peak_gb:.1f} GB with these settings")
        return chosen
    explicit = tried[0] if len(options) == 1 else tried[-1]
    raise DoesNotFit(what_to_change(planner, explicit, budget_gb))


def with_host_budget(plan: Plan, host_budget_gb: float | None, fitting: list[Plan]) -> Plan:
    """The plan checked against this machine's RAM: a note when it needs more, naming settings that
    fit both (among `fitting`, the GPU-fitting ones auto could take) or what the least needs."""
    plan.host_budget_gb = host_budget_gb
    if plan.fits_host:
        return plan
    others = [p for p in fitting if p.fits_host] or sorted(fitting, key=lambda p: p.host_ram_gb)[:1]
    advice = "; ".join(f"{p.settings.describe()} needs {p.host_ram_gb:.1f} GB" for p in others[:2]
                       if p.settings != plan.settings)
    plan.notes.append(f"host RAM: {plan.host_ram_gb:.1f} GB needed, {host_budget_gb:.1f} GB available: "
                      "the system may swap or stop the run" + (f" ({advice})" if advice else ""))
    return plan


def choice_note(chosen: Plan, tried: list[Plan]) -> str:
    before = [p for p in tried[:tried.index(chosen)]]
    if not before:
        return f"chosen: {chosen.settings.describe()} (the least lossy settings; they fit)"
    refused = ", ".join(f"{p.settings.base_precision}{' + checkpointing' if p.settings.gradient_checkpointing else ''}"
                        f"{' + offload' if p.settings.offload == 'blocks' else ''} needs "
                        + (f"{p.host_ram_gb:.1f} GB of host RAM" if p.fits else f"{p.peak_gb:.1f} GB")
                        for p in before)
    return f"chosen: {chosen.settings.describe()}, the least lossy that fits ({refused})"


def what_to_change(planner: Planner, plan: Plan, budget_gb: float) -> str:
    """`needs 31.2 GB, this GPU has 23.6 GB free: base_precision=fp8 (17.9 GB) or int8 (17.2 GB)`"""
    s = plan.settings
    fitting = []
    for option in planner.candidates("auto", "auto", s.gradient_checkpointing):
        candidate = planner.plan(option, budget_gb)
        if candidate.fits:
            changes = [f"{k}={v if not isinstance(v, bool) else str(v).lower()}"
                       for k, v in asdict(option).items() if getattr(s, k) != v]
            fitting.append(f"{', '.join(changes)} ({candidate.peak_gb:.1f} GB)")
    advice = " or ".join(fitting[:2]) if fitting else "nothing this trainer offers fits: a smaller resolution or a larger GPU"
    return (f"memory plan: {s.describe()} needs {plan.peak_gb:.1f} GB, this GPU has {budget_gb:.1f} GB free"
            f" (gpu_memory_gb): {advice}.")


def gpu_budget_gb(gpu_memory_gb: float) -> float | None:
    """gpu_memory_gb when set, else the GPU's free memory now; None without a GPU."""
    if gpu_memory_gb > 0:
        return gpu_memory_gb
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0] / GB


def host_ram_total_gb() -> float | None:
    """This machine's RAM (MemTotal), None where /proc/meminfo cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def default_storage(mixed_precision: str) -> str:
    """`auto` without a GPU budget: mixed_precision's dtype, as the rest of the pipeline loads."""
    return {"no": "fp32"}.get(mixed_precision, mixed_precision)


def plan_for(params: Any, class_images: bool | None = None, host_budget_gb: float | None = None) -> Plan:
    """The plan of a run's parameters (InputError when explicit settings do not fit); `class_images`:
    whether the run draws class images (None: whenever prior preservation has a class folder);
    `host_budget_gb`: the host RAM to check against (a run: this machine's)."""
    from ..families import family_for

    return make_plan(family_for(params.model_name), params.model_name, Run.of(params, class_images),
                     base_precision=params.base_precision, offload=params.offload,
                     gradient_checkpointing=params.gradient_checkpointing or params.offload == "blocks",
                     budget_gb=gpu_budget_gb(params.gpu_memory_gb), host_budget_gb=host_budget_gb)
