"""Several processes: two CPU processes (gloo) under torchrun train the tiny pipeline as one run.

The two-process runs are subprocesses (`torchrun --standalone --nproc_per_node 2 main.py …`);
each process writes the samples it trained on through DIFFUSION_TRAINER_TRACE_DIR.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, quick_params, train, write_config

from diffusion_trainer.errors import InputError
from diffusion_trainer.run import launch, processes, steps
from diffusion_trainer.run.trace import TRACE_ENV

TORCHRUN = Path(sys.executable).parent / "torchrun"


# --- step counts, backend and launch decisions (no processes started) --------------------------

def test_steps_count_global_optimizer_steps_across_processes():
    # the case: 4 images, batch 1, 3 epochs on 2 processes -> 2 batches each per epoch -> 6 steps
    plan = steps.plan_steps(2, 1, 3, 0)
    assert (plan.updates_per_epoch, plan.total_steps, plan.num_epochs) == (2, 6, 3)
    # 3 batches a process, accumulation 2 -> 2 updates an epoch
    plan = steps.plan_steps(3, 2, 4, 0)
    assert (plan.updates_per_epoch, plan.total_steps, plan.num_epochs) == (2, 8, 4)
    plan = steps.plan_steps(2, 1, 10, 5)  # max_train_steps caps
    assert (plan.total_steps, plan.num_epochs) == (5, 3)
    plan = steps.plan_steps(2, 1, 3, 11)  # and adds epochs, as in diffusers: 11 steps of 2 an epoch
    assert (plan.total_steps, plan.num_epochs) == (11, 6)


def test_under_deepspeed_max_grad_norm_goes_to_its_config_and_the_loop_clips_nothing():
    from accelerate.utils import DistributedType

    def accelerator(kind, config):
        return SimpleNamespace(distributed_type=kind,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))

    auto = {"gradient_clipping": "auto"}
    assert processes.loop_clipping(accelerator(DistributedType.DEEPSPEED, auto), 0.5) == (0.0, None)
    assert auto["gradient_clipping"] == 0.5  # not the 1.0 accelerate fills "auto" with
    unset = {}
    assert processes.loop_clipping(accelerator(DistributedType.DEEPSPEED, unset), 0.0) == (0.0, None)
    assert unset["gradient_clipping"] == 0.0  # no clipping asked: none
    fixed = {"gradient_clipping": 1.0}
    loop_norm, warning = processes.loop_clipping(accelerator(DistributedType.DEEPSPEED, fixed), 0.5)
    assert loop_norm == 0.0 and "max_grad_norm=0.5 is not used" in warning and "gradient_clipping=1.0" in warning
    assert processes.loop_clipping(accelerator(DistributedType.MULTI_GPU, {}), 0.5) == (0.5, None)


def test_each_process_draws_its_own_noise_and_timesteps():
    draws = []
    for rank in (0, 1):
        processes.seed_this_process(7, rank)
        draws.append((torch.randn(4), torch.randint(0, 1000, (4,))))
    assert not torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][1], draws[1][1])
    processes.seed_this_process(7, 1)  # and each stream is reproducible
    assert torch.equal(torch.randn(4), draws[1][0])


def test_an_image_transform_seeds_only_the_cpu_generator(monkeypatch):
    """fork_rng(devices=[]) restores only the CPU state: a CUDA reseed there would leak out."""
    from PIL import Image

    from diffusion_trainer.data.images import Augmentation, ImageTransform
    from diffusion_trainer.params import parse_params

    def reseeded(*args):
        raise AssertionError("the CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    params = parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", "resolution": 64,
                           "random_flip": True, "center_crop": False})[0]
    before = torch.random.get_rng_state()
    out = ImageTransform(Augmentation.of(params))(Image.new("RGB", (90, 71), "red"), seed=3)
    assert out.pixels.shape == (3, 64, 64)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine accelerate chooses NCCL itself")
def test_a_cpu_launch_asks_accelerate_for_gloo(monkeypatch):
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    assert "cpu" not in processes.accelerator_kwargs()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert processes.accelerator_kwargs()["cpu"] is True  # this machine has no CUDA


def test_the_accelerator_waits_hours_for_the_other_processes(tmp_path):
    """One process writing a large disk latent cache keeps the others in a collective for longer than
    NCCL's default 10 minutes."""
    from datetime import timedelta

    from diffusion_trainer.params import parse_params
    from diffusion_trainer.reporting import Reporter
    from diffusion_trainer.run.setup import make_accelerator

    params = parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d"})[0]
    runtime = type("Runtime", (), {"mixed_precision": "no"})()
    paths = type("Paths", (), {"logs_dir": tmp_path / "logs"})()
    accelerator = make_accelerator(params, runtime, paths, Reporter())
    assert accelerator.init_handler.timeout == timedelta(hours=4)


def test_launch_uses_accelerate_for_several_gpus_and_main_py_otherwise(monkeypatch):
    args = ["--config", "run.json"]
    main_py = str(ROOT / "main.py")
    assert launch.command(0, args, python="py") == ["py", main_py, *args]
    assert launch.command(1, args, python="py") == ["py", main_py, *args]
    several = launch.command(4, args, python="py")
    assert several[:5] == ["py", "-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert several[-3:] == [main_py, *args]
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(several[3:])  # flags accelerate launch accepts
    assert (parsed.num_processes, parsed.training_script, parsed.training_script_args) == (4, main_py, args)
    assert launch.command(4, args, python="py", already_launched=True) == ["py", main_py, *args]

    ran = []
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: ran.append(argv))
    monkeypatch.setattr(launch, "visible_gpus", lambda: 2)
    for key in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    launch.main(["--input_file", "in.json"])
    assert ran[-1][ran[-1].index("--num_processes") + 1] == "2" and ran[-1][-2:] == ["--input_file", "in.json"]
    import diffusion_trainer.launch as public  # `python -m diffusion_trainer.launch`, task.yaml's run line

    assert public.main is launch.main


def test_only_the_main_process_reaches_the_lab():
    calls = []

    class FakeLabReporter:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append(name)

    other = processes.ProcessReporter(FakeLabReporter(), main=False)
    other.info("hello")
    other.begin(5)
    other.report(1, 5, {"loss": 1.0})
    other.record_outputs(eval_images_dir=None, tensorboard_dir=Path("."))
    other.completed("done", {})
    assert calls == [] and not any(other.stop_requested() for _ in range(25))
    other.failed("boom")  # a failure is the exception: the job must hear of it (test below)
    assert calls == ["failed_in_another_process"]
    calls.clear()
    main = processes.ProcessReporter(FakeLabReporter(), main=True)
    main.info("hello")
    main.completed("done", {})
    assert calls == ["info", "completed"]


def test_the_other_processes_read_the_lab_job_without_writing_it(monkeypatch):
    import asyncio
    import uuid

    from lab import Experiment, Job

    from diffusion_trainer.lab import launch as lab_launch

    name = f"exp_{uuid.uuid4().hex[:8]}"
    job = asyncio.run(asyncio.run(Experiment.create_or_get(name, create_new=True)).create_job())
    asyncio.run(job.update_job_data_field("parameters", {"lora_r": "4"}))
    before = asyncio.run(job.get_status()), asyncio.run(job.get_job_data())
    monkeypatch.setenv("_TFL_JOB_ID", str(job.id))
    monkeypatch.setenv("_TFL_EXPERIMENT_ID", name)
    monkeypatch.setenv("RANK", "1")
    lab = lab_launch.connect_lab()
    assert lab.get_config() == {"lora_r": "4"}
    fresh = asyncio.run(Job.get(job.id, name))
    assert (asyncio.run(fresh.get_status()), asyncio.run(fresh.get_job_data())) == before  # lab.init() writes RUNNING


def test_fsdp_and_zero3_are_refused_with_what_to_use_instead():
    from accelerate.utils import DistributedType

    with pytest.raises(InputError, match="FSDP.*DDP"):
        processes.refuse_unsupported(SimpleNamespace(distributed_type=DistributedType.FSDP))
    zero3 = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(InputError, match="stage 1 or 2"):
        processes.refuse_unsupported(zero3)
    zero2 = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    processes.refuse_unsupported(zero2)
    processes.refuse_unsupported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


# --- two processes --------------------------------------------------------------------------

def torchrun(tmp_path: Path, script: Path, config: Path, trace: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, TRACE_ENV: str(trace), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           **env_extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), "--config",
                           str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_train_one_run_on_disjoint_halves(tmp_path, monkeypatch, tiny_sd, star_folder):
    # 8 images, batch 1 on each of 2 processes, 2 epochs: 4 global steps an epoch, 8 in all
    settings = dict(num_train_epochs=2, lr_scheduler="linear", lr_warmup_steps=2, eval_prompt="a sks star",
                    eval_steps=100, cache_memory_budget_mb=0)  # latents cached on disk, written once
    output = tmp_path / "output"
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, output, train_batch_size=1,
                                                              **settings))
    result = torchrun(tmp_path, ROOT / "main.py", config, tmp_path / "trace")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]

    # announced once (the main process speaks alone), and kept
    assert re.findall(r"Training 8 images for (\d+) optimizer steps", log) == ["8"]
    assert re.findall(r"Done in .*?: (\d+) optimizer steps", log) == ["8"]
    ranks = [read_trace(tmp_path / "trace" / f"rank{k}.jsonl") for k in (0, 1)]
    assert [len(r) for r in ranks] == [8, 8]  # batch 1, no accumulation: one line per optimizer step
    # each process draws its own noise and timesteps: no step starts from the same RNG state twice
    assert not {line["rng"] for line in ranks[0]} & {line["rng"] for line in ranks[1]}
    for epoch in sorted({line["epoch"] for line in ranks[0]}):
        halves = [[i for line in r if line["epoch"] == epoch for i in line["indices"]] for r in ranks]
        assert not set(halves[0]) & set(halves[1])
        assert sorted(halves[0] + halves[1]) == list(range(8))

    # one adapter, one eval image, one TensorBoard log, nothing half-written
    assert sorted(p.name for p in output.iterdir()) == ["cache", "checkpoints", "eval_images", "logs", "test_lora"]
    assert len([p for p in (output / "cache").iterdir() if p.name.startswith("latents-")]) == 1
    assert not [p for p in output.rglob("*") if ".partial" in p.name]
    adapter = output / "test_lora"
    assert json.loads((adapter / "tlab_adaptor_info.json").read_text())["steps_trained"] == 8
    assert sorted(p.name for p in (output / "eval_images" / "test_lora").iterdir()) == ["before.png", "final.png"]
    writers = {p.name.split(".")[-2] for p in (output / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # events.out.tfevents.<time>.<host>.<pid>.<n>: one process wrote them
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(adapter))

    # the learning rate follows the single-process run with the same global batch (2)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "single"))
    code, _ = train(tmp_path / "one", tiny_sd, star_folder, train_batch_size=2, **settings)
    assert code == 0
    single = read_trace(tmp_path / "single" / "rank0.jsonl")
    assert [line["lr"] for line in single] == pytest.approx([line["lr"] for line in ranks[0]])
    assert [line["lr"] for line in ranks[0]] == [line["lr"] for line in ranks[1]]
    # linear, warmup 2 of 8 steps, 1e-3: up over steps 0-1, down to 0 over steps 2-8
    assert [line["lr"] for line in single] == pytest.approx([k / 2 * 1e-3 if k < 2 else (8 - k) / 6 * 1e-3
                                                            for k in range(8)])


def trained_per_epoch(trace: Path) -> dict[int, list[list[int]]]:
    """{epoch: every process's trained indices}, from the traced loader's lines."""
    ranks = [read_trace(trace / f"rank{k}.jsonl") for k in (0, 1)]
    epochs = sorted({line["epoch"] for r in ranks for line in r})
    return {e: [[i for line in r if line["epoch"] == e for i in line["indices"]] for r in ranks] for e in epochs}


def test_an_uneven_dataset_trains_every_image_every_epoch_in_the_announced_steps(tmp_path, tiny_sd, star_folder):
    # 9 images, batch 2, 2 processes: 5 batches (the last topped up), 6 with one extra: 3 steps an epoch
    import shutil

    data = tmp_path / "nine"
    shutil.copytree(star_folder, data)
    shutil.copy(star_folder / "0003.png", data / "0008.png")
    (data / "0008.txt").write_text("a big sks star\n")
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, data, tmp_path / "output", train_batch_size=2,
                                                              num_train_epochs=2, lr_scheduler="linear"))
    result = torchrun(tmp_path, ROOT / "main.py", config, tmp_path / "trace")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert re.findall(r"Training 9 images for (\d+) optimizer steps", log) == ["6"]
    assert re.findall(r"Done in .*?: (\d+) optimizer steps", log) == ["6"]
    epochs = trained_per_epoch(tmp_path / "trace")
    assert sorted(epochs) == [1, 2]
    for halves in epochs.values():
        assert [len(h) for h in halves] == [6, 6]  # 3 full batches of 2 on each process
        assert set(halves[0] + halves[1]) == set(range(9))


def test_uneven_buckets_on_two_processes_train_full_batches_of_one_shape(tmp_path, tiny_sd):
    # 7 square, 6 wide, 3 tall at 128 px, batch 4: 2 + 2 + 1 topped-up batches and one extra, 3 steps an epoch
    from PIL import Image

    sizes = [(128, 128)] * 7 + [(192, 128)] * 6 + [(128, 192)] * 3  # (w, h)
    order = [0, 7, 13, 1, 8, 14, 2, 9, 15, 3, 10, 4, 11, 5, 12, 6]  # shapes interleaved in the folder
    data = tmp_path / "mixed"
    data.mkdir()
    for n, k in enumerate(order):
        Image.new("RGB", sizes[k], (15 * k, 120, 200)).save(data / f"{n:04d}.png")
        (data / f"{n:04d}.txt").write_text(f"picture {n}\n")
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, data, tmp_path / "output", resolution=128,
                                                              aspect_ratio_bucketing=True, train_batch_size=4,
                                                              num_train_epochs=2))
    result = torchrun(tmp_path, ROOT / "main.py", config, tmp_path / "trace")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert re.findall(r"Training 16 images for (\d+) optimizer steps", log) == ["6"]
    assert re.findall(r"Done in .*?: (\d+) optimizer steps", log) == ["6"]
    shape_of = {n: sizes[k] for n, k in enumerate(order)}
    for rank in (0, 1):
        lines = read_trace(tmp_path / "trace" / f"rank{rank}.jsonl")
        assert len(lines) == 6 and all(len({shape_of[i] for i in line["indices"]}) == 1 for line in lines)
    for halves in trained_per_epoch(tmp_path / "trace").values():
        assert set(halves[0] + halves[1]) == set(range(16))


FAILING_RANK_1 = """
import os, sys
sys.argv[0] = "main.py"
from diffusion_trainer.run import loop
original = loop.batch_loss
batches = []

def batch_loss(t, batch):
    batches.append(1)
    if os.environ["RANK"] == "1" and len(batches) == 3:
        raise RuntimeError("disk on fire in process 1")
    return original(t, batch)

loop.batch_loss = batch_loss
import main
main.main(sys.argv[1:])
"""


def test_a_failure_in_one_process_ends_the_run_with_its_message(tmp_path, tiny_sd, star_folder):
    output = tmp_path / "output"
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, output, train_batch_size=1,
                                                              num_train_epochs=20))
    script = tmp_path / "failing_main.py"
    script.write_text(FAILING_RANK_1)
    result = torchrun(tmp_path, script, config, tmp_path / "trace")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "disk on fire in process 1" in log
    assert len(read_trace(tmp_path / "trace" / "rank0.jsonl")) < 10  # ended, not trained on to the end
    assert not (output / "test_lora").exists()


DECIDING_RANK_1 = """
import os, sys
sys.argv[0] = "main.py"
from diffusion_trainer.run import train

def refuse(*args, **kwargs):
    raise RuntimeError("process 1 looked at the checkpoints itself")

if os.environ["RANK"] == "1":
    train.tidy_outputs = train.choose_checkpoint = refuse
import main
main.main(sys.argv[1:])
"""


def test_the_main_process_alone_tidies_and_chooses_the_checkpoint_every_process_resumes(tmp_path, tiny_sd,
                                                                                         star_folder):
    script = tmp_path / "deciding_main.py"
    script.write_text(DECIDING_RANK_1)
    output = tmp_path / "output"
    # 8 images, batch 1 on each of 2 processes: 4 steps an epoch
    first = dict(train_batch_size=1, num_train_epochs=1, checkpointing_steps=2)
    config = write_config(tmp_path / "run.json", quick_params(tiny_sd, star_folder, output, **first))
    result = torchrun(tmp_path, script, config, tmp_path / "trace1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    config = write_config(tmp_path / "resume.json", quick_params(tiny_sd, star_folder, output, **{
        **first, "num_train_epochs": 2, "resume_from_checkpoint": "latest"}))
    result = torchrun(tmp_path, script, config, tmp_path / "trace2")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert re.findall(r"Resuming from \S+checkpoint-(\d+): step \d+ of (\d+)", log) == [("4", "8")]
    assert [len(read_trace(tmp_path / "trace2" / f"rank{k}.jsonl")) for k in (0, 1)] == [4, 4]  # both resumed


def test_a_failure_in_another_process_fails_the_lab_job_with_its_message(tmp_path, tiny_sd, star_folder):
    import asyncio
    import uuid

    from lab import Experiment, Job
    from test_lab import task_job

    name = f"exp_{uuid.uuid4().hex[:8]}"
    job = asyncio.run(asyncio.run(Experiment.create_or_get(name, create_new=True)).create_job())
    task_job(job, name, tiny_sd, star_folder, tmp_path / "output", train_batch_size=1, num_train_epochs=20,
             eval_prompt="")
    config = write_config(tmp_path / "run.json", {})
    script = tmp_path / "failing_main.py"
    script.write_text(FAILING_RANK_1)
    result = torchrun(tmp_path, script, config, tmp_path / "trace", _TFL_JOB_ID=str(job.id), _TFL_EXPERIMENT_ID=name)
    assert result.returncode != 0
    fresh = asyncio.run(Job.get(job.id, name))
    status, data = asyncio.run(fresh.get_status()), asyncio.run(fresh.get_job_data())
    assert status == "FAILED", (result.stdout + result.stderr)[-3000:]
    assert data["completion_details"].startswith("Process 1 failed: ")
    assert "disk on fire in process 1" in data["completion_details"]


def test_flux2_klein_on_two_processes_trains_an_uneven_dataset_in_the_announced_steps(tmp_path, tiny_family,
                                                                                     star_folder):
    """Issue 22's families under torchrun: FLUX.2 [klein] (Qwen3 prompt embeddings cached per process),
    3 images on 2 processes at batch 1: 2 batches a process an epoch (the last topped up), 2 epochs."""
    import shutil

    from diffusers import DiffusionPipeline

    data = tmp_path / "three"
    data.mkdir()
    for name in ("0000", "0001", "0002"):
        for ext in (".png", ".txt"):
            shutil.copy(star_folder / f"{name}{ext}", data / f"{name}{ext}")
    model = tiny_family("flux2_klein")
    output = tmp_path / "output"
    config = write_config(tmp_path / "run.json", quick_params(model, data, output, train_batch_size=1,
                                                              num_train_epochs=2, learning_rate=5e-3))
    result = torchrun(tmp_path, ROOT / "main.py", config, tmp_path / "trace")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert re.findall(r"Training 3 images for (\d+) optimizer steps", log) == ["4"]
    assert re.findall(r"Done in .*?: (\d+) optimizer steps", log) == ["4"]
    for halves in trained_per_epoch(tmp_path / "trace").values():
        assert [len(h) for h in halves] == [2, 2] and set(halves[0] + halves[1]) == {0, 1, 2}
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    text = torch.randn(1, 8, pipe.transformer.config.joint_attention_dim, generator=torch.Generator().manual_seed(0))

    def draw():  # one denoising step on fixed prompt features, no guidance: the transformer and the VAE only
        return pipe(prompt_embeds=text, guidance_scale=1.0, num_inference_steps=1, height=64, width=64,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = draw()
    pipe.load_lora_weights(str(output / "test_lora"))
    assert abs(draw() - before).mean() > 1e-4
