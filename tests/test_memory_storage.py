"""The frozen base's storage (base_precision fp8/int8/nf4, offload=blocks) and staged loading, end to
end through main.py on the tiny Flux pipeline: each mode trains the LoRA alone (its weights move, the
stored base does not), the adapter loads on the unquantized base in diffusers and changes the image,
a quantized run resumes exactly, int8 stores the denoiser in about half of bf16's bytes, and the text
encoders are gone before the denoiser loads."""

from __future__ import annotations

import contextlib
import gc
import io
import shutil
import weakref

import pytest
import torch
from conftest import run_folder, train
from diffusers import FluxPipeline
from safetensors.torch import load_file

from diffusion_trainer.families.flux import Flux
from diffusion_trainer.families.flux2 import Flux2
from diffusion_trainer.memory import offload, storage
from diffusion_trainer.memory import plan as memory_plan
from diffusion_trainer.run import setup

PROMPT = "a sks star"
FAST = dict(resolution=64, train_batch_size=2, max_train_steps=2, learning_rate=1e-2, lora_r=4, lora_alpha=4,
            center_crop=True)
MODES = {"fp8": {"base_precision": "fp8"}, "int8": {"base_precision": "int8", "checkpointing_steps": 2},
         "nf4": {"base_precision": "nf4"}, "offload": {"offload": "blocks"}}
DESCRIBED = {"fp8": "fp8 (float8_e4m3fn)", "int8": "int8 (torchao, weight-only)", "nf4": "nf4 (bitsandbytes 4-bit)",
             "offload": "fp32"}


def snapshot(module: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every frozen tensor as stored (a quantized one by the tensors it holds), copied."""
    def parts(t: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(type(t), "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            return [x for n in t.__tensor_flatten__()[0] for x in parts(getattr(t, n))]
        return [t.detach().view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.detach().clone()]
    return {n.replace(".base_layer", ""): parts(p) for n, p in module.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_family, one_star):
    """Each mode trained once (2 steps), with what the run's loading did, recorded."""
    model = tiny_family("flux")
    done = {}
    for name, mode in MODES.items():
        seen: dict = {}
        with pytest.MonkeyPatch.context() as mp:
            load_family, load_denoiser, stream_blocks = setup.load_family, setup.load_denoiser, setup.stream_blocks

            def recording_family(*args, **kwargs):
                family = load_family(*args, **kwargs)
                seen["encoders"] = [weakref.ref(m) for m in family.text_encoders]
                return family

            def recording_denoiser(*args, **kwargs):
                gc.collect()
                seen["encoders alive"] = [r() is not None for r in seen["encoders"]]
                denoiser = load_denoiser(*args, **kwargs)
                seen["denoiser"], seen["before"] = denoiser, snapshot(denoiser)
                return denoiser

            def recording_swap(*args, **kwargs):
                seen["swap"] = stream_blocks(*args, **kwargs)
                return seen["swap"]

            mp.setattr(setup, "load_family", recording_family)
            mp.setattr(setup, "load_denoiser", recording_denoiser)
            mp.setattr(setup, "stream_blocks", recording_swap)
            mp.setattr(offload, "RESIDENT", 1)  # two blocks in the tiny model: swap them
            log = tmp_path_factory.mktemp(name) / "log.txt"
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code, out = train(log.parent / "run", model, one_star, **FAST, **mode)
            seen["log"] = err.getvalue()
        assert code == 0, seen["log"][-3000:]
        done[name] = (out, seen)
    return model, done


@pytest.mark.parametrize("name", list(MODES))
def test_each_storage_mode_trains_the_lora_alone_and_its_adapter_loads_on_the_full_base(runs, name):
    model, done = runs
    out, seen = done[name]
    assert f"Denoiser loaded: {DESCRIBED[name]}" in seen["log"]
    # staged: the text encoders were freed (gone from memory) before the denoiser loaded
    assert seen["encoders alive"] == [False, False]
    assert "text encoders still loaded: none" in seen["log"]
    after = snapshot(seen["denoiser"])
    assert after.keys() == seen["before"].keys()
    assert all(torch.equal(a, b) for n in after for a, b in zip(after[n], seen["before"][n]))  # base untouched
    lora = load_file(out / "test_lora" / "pytorch_lora_weights.safetensors")
    assert all(t.dtype == torch.float32 for t in lora.values())
    assert any(t.abs().max() > 0 for k, t in lora.items() if "lora_B" in k)  # trained (lora_B starts at 0)
    if name == "offload":
        swap = seen["swap"]
        assert "offload=blocks: 2 blocks' frozen weights" in seen["log"]
        assert swap.onloads >= 4 and len(swap.resident) == 1  # each block brought over again and again

    pipe = FluxPipeline.from_pretrained(str(model))  # the fp32 base, not quantized
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(str(out / "test_lora"), weight_name="pytorch_lora_weights.safetensors")
    assert abs(image() - before).mean() > 1e-4


def test_an_int8_run_resumes_exactly(runs, one_star, tmp_path):
    model, done = runs
    out, _ = done["int8"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out.parent, resumed)
    shutil.rmtree(resumed / "output" / "test_lora")
    checkpoint = run_folder(resumed / "output") / "checkpoint-2"
    code, again = train(resumed, model, one_star, **{**FAST, "max_train_steps": 3}, **MODES["int8"],
                        resume_from_checkpoint=str(checkpoint))
    assert code == 0
    # the same three steps without a break
    code, straight = train(tmp_path / "straight", model, one_star, **{**FAST, "max_train_steps": 3}, **MODES["int8"])
    assert code == 0
    a = load_file(straight / "test_lora" / "pytorch_lora_weights.safetensors")
    b = load_file(again / "test_lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int8_stores_the_denoiser_in_about_half_of_bf16s_bytes(tiny_family):
    family = Flux.load(str(tiny_family("flux")), torch.float32, without_denoiser=True)
    assert not family.denoiser_loaded
    sizes = {}
    for precision in ("bf16", "int8", "nf4"):
        base = storage.resolve_storage(precision, torch.float32, torch.float32)
        denoiser = family.load_denoiser(**base.load_kwargs(cuda=False))
        storage.apply_base_storage(denoiser, base, cuda=False)
        linear = [m for m in denoiser.modules() if type(m).__name__ in ("Linear", "Linear4bit")]
        sizes[precision] = sum(storage.stored_bytes(m) for m in linear)
    assert 0.4 < sizes["int8"] / sizes["bf16"] < 0.6  # one byte a weight (and a scale a row) for two
    assert sizes["nf4"] / sizes["bf16"] < 0.35


def test_the_plan_keeps_what_a_feature_needs_on_the_gpu(tiny_sd):
    from diffusion_trainer.families.sd import StableDiffusion

    def stages(**run):
        plan = memory_plan.make_plan(StableDiffusion, str(tiny_sd), memory_plan.Run(64, 1, 4, "default", "no", **run),
                                     base_precision="fp32", offload="none", gradient_checkpointing=False, budget_gb=8)
        return {s.name: s.on_device for s in plan.stages}

    assert not any("text_encoder" in k for k in stages()["train step"])  # cached, freed
    assert any(k.startswith("text_encoder ") for k in stages(train_text_encoder=True)["train step"])
    assert any(k.startswith("text_encoder ") for k in stages(cache_text_embeddings=False)["train step"])
    drawing = stages(class_images=True)["class images"]
    assert any(k.startswith("unet") for k in drawing) and any(k.startswith("text_encoder ") for k in drawing)


def test_a_text_encoder_that_does_not_fit_beside_the_rest_is_planned_and_loaded_quantized(tiny_family, one_star):
    """FLUX.1-dev at 8 GB: the plan stores T5 (9.5 GB in bf16) in int8 to encode; FLUX.2-dev at 24 GB its
    Mistral (24 B) in nf4. The run's first stage does so (torchao / bitsandbytes tensors), the text still
    encoding."""
    from pathlib import Path

    from diffusion_trainer.params import TrainingParams

    real = Path(__file__).parent / "real_configs" / "flux1_dev"
    plan = memory_plan.make_plan(Flux, str(real), memory_plan.Run(1024, 1, 16, "default", "bf16"),
                                 base_precision="auto", offload="auto", gradient_checkpointing=False, budget_gb=8)
    assert plan.quantized_text_encoders == {"text_encoder_2": "int8"} and plan.stages[0].peak_gb <= 8
    assert not memory_plan.make_plan(Flux, str(real), memory_plan.Run(1024, 1, 16, "default", "bf16"),
                                     base_precision="auto", offload="auto", gradient_checkpointing=False,
                                     budget_gb=24).quantized_text_encoders
    mistral = memory_plan.make_plan(Flux2, str(real.parent / "flux2_dev"), memory_plan.Run(1024, 1, 16, "default", "bf16"),
                                    base_precision="auto", offload="auto", gradient_checkpointing=True, budget_gb=24)
    assert mistral.quantized_text_encoders == {"text_encoder": "nf4"}  # 24 B parameters: 8 bits do not fit in 24 GB

    class Quiet:
        def info(self, message):
            pass

    params = TrainingParams(adaptor_name="a", model_name=str(tiny_family("flux")), dataset_name=str(one_star))
    for bits, stored_as in (("int8", "AffineQuantizedTensor|Int8Tensor"), ("nf4", "Params4bit")):
        family = setup.load_family(Flux, params, setup.Runtime("no", False),
                                   type("A", (), {"device": torch.device("cpu")}), Quiet(), {"text_encoder_2": bits})
        t5_linear = [m.weight for m in family.pipeline.text_encoder_2.modules() if isinstance(m, torch.nn.Linear)]
        assert t5_linear and all(type(w).__name__ != "Parameter" for w in t5_linear), bits  # quantized tensors
        assert bits == "int8" or all(type(w).__name__ in stored_as for w in t5_linear)
        with torch.no_grad():
            assert family.encode_prompts([PROMPT])["encoder_hidden_states"].isfinite().all()


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_offload_has_every_frozen_layer_on_the_device_when_it_runs_also_when_backward_recomputes(
        name, tiny_sd, tiny_family, monkeypatch):
    """A UNet checkpoints its resnets and attention, inside the blocks the swap moves: their recomputation
    in backward runs no block's forward, so the swap must act on each layer (on a CPU nothing fails by
    itself; the layers' places are tracked instead)."""
    from types import SimpleNamespace

    from diffusion_trainer.data.batch import ModelInputs
    from diffusion_trainer.families import family_for
    from diffusion_trainer.lora import AdapterSpec, attach
    from diffusion_trainer.params import parse_params
    from diffusion_trainer.run import loop

    model = tiny_sd if name == "sd" else tiny_family("flux")
    family = family_for(str(model)).load(str(model), torch.float32)
    denoiser = family.denoiser
    attach(denoiser, AdapterSpec("lora", 4, 4), family.lora_targets("attention"))
    denoiser.enable_gradient_checkpointing()
    denoiser.train()
    on_device, late = set(), []
    move = offload.BlockSwap.move

    def tracked(self, leaf, to_device):
        move(self, leaf, to_device)
        (on_device.add if to_device else on_device.discard)(id(leaf))

    monkeypatch.setattr(offload.BlockSwap, "move", tracked)
    monkeypatch.setattr(offload, "RESIDENT", 1)
    swap = offload.stream_blocks(denoiser, torch.device("cpu"))
    for block in swap.blocks:  # registered after the swap's hooks, so these run after them
        for leaf in swap.leaves[id(block)]:
            leaf.register_forward_pre_hook(lambda m, args: None if id(m) in on_device else late.append(m))
    params = parse_params({"adaptor_name": "a", "model_name": str(model), "dataset_name": "d", "resolution": 64})[0]
    family.configure_objective(params, family.model_prediction_type())
    batch = {"pixel_values": torch.rand(1, 3, 64, 64) * 2 - 1, "caption": ["a sks star"],
             "original_size": torch.tensor([[64, 64]]), "crop_top_left": torch.tensor([[0, 0]]),
             "target_size": torch.tensor([[64, 64]])}
    t = SimpleNamespace(inputs=ModelInputs(family, 0.0, torch.device("cpu")), family=family, denoiser=denoiser,
                        loss_type="l2", huber_c=0.1)
    torch.manual_seed(0)
    loop.batch_loss(t, batch)[0].backward()
    assert swap.onloads > len(swap.blocks) and late == []


def hooked(module: torch.nn.Module) -> set[str]:
    """The names of the modules diffusers' layerwise casting upcasts as they run."""
    return {name for name, m in module.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("layerwise_casting")}


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """The names of parameters and buffers that differ in dtype or bits (every one of both models)."""
    ta, tb = {**dict(a.named_parameters()), **dict(a.named_buffers())}, {**dict(b.named_parameters()), **dict(b.named_buffers())}
    assert ta.keys() == tb.keys()
    return [n for n in ta if ta[n].dtype != tb[n].dtype or ta[n].device != tb[n].device
            or not torch.equal(ta[n].view(torch.uint8) if ta[n].dtype.itemsize == 1 else ta[n],
                               tb[n].view(torch.uint8) if tb[n].dtype.itemsize == 1 else tb[n])]


CAST_CASES = [(name, "fp8", "bf16") for name in ("sd", "sdxl", "sd3", "flux", "flux2", "chroma", "z_image", "qwen_image")]
CAST_CASES += [("sd", "fp8", "no"), ("flux", "fp8", "no"), ("flux", "bf16", "no")]


@pytest.mark.parametrize("name,precision,mixed", CAST_CASES)
def test_a_cast_storage_reads_each_tensor_into_its_storage_dtype_giving_from_pretrained_then_casting(
        name, precision, mixed, tiny_sd, tiny_family, tmp_path):
    """memory/cast_loading.py, as the run calls it (setup.load_denoiser): the same tensors, bit for bit and
    dtype for dtype, and the same layers upcast, as from_pretrained in the load dtype then layerwise casting
    (which held the whole model in that dtype first); the flux case reads a denoiser saved in three shards."""
    from diffusers import FluxTransformer2DModel

    from diffusion_trainer.families import family_for

    model = tiny_sd if name == "sd" else tiny_family(name)
    if name == "flux":  # the same weights in shards, with their index, as large models are saved
        model = tmp_path / "sharded"
        shutil.copytree(tiny_family("flux"), model)
        shutil.rmtree(model / "transformer")
        FluxTransformer2DModel.from_pretrained(tiny_family("flux"), subfolder="transformer").save_pretrained(
            model / "transformer", max_shard_size="40KB")
        assert len(list((model / "transformer").glob("*.safetensors"))) >= 3
    family_cls = family_for(str(model))
    compute = setup.WEIGHT_DTYPES[mixed]
    base = storage.resolve_storage(precision, compute, compute)
    assert base.casts_layers
    reference = family_cls.load(str(model), compute, without_denoiser=True).load_denoiser(**base.load_kwargs(False))
    storage.apply_base_storage(reference, base, cuda=False)
    family = family_cls.load(str(model), compute, without_denoiser=True)
    said = []
    reporter = type("Reporter", (), {"info": lambda self, message: said.append(message)})()
    cpu = type("Accelerator", (), {"device": torch.device("cpu")})()
    read = setup.load_denoiser(family, precision, "none", setup.Runtime(mixed, False), cpu, reporter)
    assert not any("cannot be read tensor by tensor" in m for m in said), said
    assert any(m.startswith("Denoiser loaded:") and "(each tensor cast as it was read)" in m for m in said), said
    assert read is family.denoiser and family.denoiser_loaded
    assert same_tensors(reference, read) == []
    assert hooked(read) == hooked(reference) and hooked(read)
    assert any(p.dtype == storage.PLAIN.get(precision, torch.float8_e4m3fn) for p in read.parameters())


def test_a_denoiser_with_missing_weights_is_refused_naming_them_and_fp32_kept_modules_load_through_from_pretrained(
        tiny_family, tmp_path, monkeypatch):
    """Files lacking a weight the model has: refused before any weight is read, naming it. A model with
    modules kept in fp32 cannot be cast as read: the run loads it through from_pretrained then casting,
    and says what that holds in host RAM."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from diffusion_trainer.errors import InputError

    said = []
    reporter = type("Reporter", (), {"info": lambda self, message: said.append(message)})()
    cpu = type("Accelerator", (), {"device": torch.device("cpu")})()
    model = tmp_path / "renamed"
    shutil.copytree(tiny_family("flux"), model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({n.replace("norm_out", "norm_final"): t for n, t in tensors.items()}, weights)
    family = Flux.load(str(model), torch.bfloat16, without_denoiser=True)
    with pytest.raises(InputError, match=r"model_name: the transformer files .* lack 2 .*norm_out\.linear\.bias"):
        setup.load_denoiser(family, "fp8", "none", setup.Runtime("bf16", False), cpu, reporter)

    monkeypatch.setattr(FluxTransformer2DModel, "_keep_in_fp32_modules", ["norm_out"])
    family = Flux.load(str(tiny_family("flux")), torch.bfloat16, without_denoiser=True)
    denoiser = setup.load_denoiser(family, "fp8", "none", setup.Runtime("bf16", False), cpu, reporter)
    assert any("cannot be read tensor by tensor" in m and "bf16 copy" in m for m in said), said
    assert hooked(denoiser) and not any(p.is_meta for p in denoiser.parameters())


def test_a_hub_ids_denoiser_is_cast_as_read_from_the_hub_cache(tiny_family, tmp_path, monkeypatch):
    """A hub id (offline, from the hub's cache as a download leaves it): the sharded denoiser's files
    are found through the hub like from_pretrained's, and each tensor is cast as it is read."""
    import huggingface_hub.constants
    from diffusers import FluxTransformer2DModel

    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_family("flux"), snapshot)
    shutil.rmtree(snapshot / "transformer")
    FluxTransformer2DModel.from_pretrained(tiny_family("flux"), subfolder="transformer").save_pretrained(
        snapshot / "transformer", max_shard_size="40KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from diffusion_trainer.memory.cast_loading import weight_files

    files = weight_files("someone/tiny-flux", "transformer")
    assert files and len(files) >= 3 and all(f.is_file() and snapshot.name in str(f) for f in files)
    said = []
    reporter = type("Reporter", (), {"info": lambda self, message: said.append(message)})()
    cpu = type("Accelerator", (), {"device": torch.device("cpu")})()
    family = Flux.load("someone/tiny-flux", torch.bfloat16, without_denoiser=True)
    read = setup.load_denoiser(family, "fp8", "none", setup.Runtime("bf16", False), cpu, reporter)
    assert any("(each tensor cast as it was read)" in m for m in said), said
    base = storage.resolve_storage("fp8", torch.bfloat16, torch.bfloat16)
    reference = Flux.load(str(tiny_family("flux")), torch.bfloat16, without_denoiser=True).load_denoiser(
        **base.load_kwargs(False))
    storage.apply_base_storage(reference, base, cuda=False)
    assert same_tensors(reference, read) == []
