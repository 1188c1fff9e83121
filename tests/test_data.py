"""What the loader yields: augmentations, crops, captions, and the dataset layouts it reads."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from conftest import train
from PIL import Image
from transformers import CLIPTextModel

from diffusion_trainer.data.images import to_rgb, upright_sizes
from diffusion_trainer.data.sources import load_records
from diffusion_trainer.demo import shapes
from diffusion_trainer.errors import InputError
from diffusion_trainer.outputs.export import training_captions
from diffusion_trainer.params import ParamsError, parse_params
from diffusion_trainer.run.setup import training_samples

OFF = {"center_crop": True, "random_flip": False, "color_jitter": False, "random_rotation": False}


def params(**values):
    return parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", "resolution": 64,
                         **OFF, **values})[0]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Asymmetric pictures, some wider than tall, so every augmentation has something to change."""
    folder = tmp_path_factory.mktemp("asym")
    for i in range(4):
        image = Image.new("RGB", (96 if i % 2 else 64, 64), (230, 230, 230))
        image.paste(shapes.draw("triangle", (200, 30, 30), 0.5, (0.3, 0.4), (230, 230, 230)), (0, 0))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red triangle {i}")
    return load_records(str(folder), "image", "text")


def epochs_of(records, p, epochs=(1, 2, 3)):
    samples = training_samples(records, p)
    out = []
    for epoch in epochs:
        samples.set_epoch(epoch)
        out.append(torch.stack([samples[i]["pixel_values"] for i in range(len(samples))]))
    return out


def test_with_every_augmentation_off_the_images_are_identical_every_epoch(records):
    first, *rest = epochs_of(records, params())
    assert all(torch.equal(first, other) for other in rest)


@pytest.mark.parametrize("flag", [
    {"random_flip": True},
    {"center_crop": False},
    {"color_jitter": True, "color_jitter_brightness": 0.5, "color_jitter_contrast": 0, "color_jitter_saturation": 0, "color_jitter_hue": 0},
    {"color_jitter": True, "color_jitter_brightness": 0, "color_jitter_contrast": 0.5, "color_jitter_saturation": 0, "color_jitter_hue": 0},
    {"color_jitter": True, "color_jitter_brightness": 0, "color_jitter_contrast": 0, "color_jitter_saturation": 0.5, "color_jitter_hue": 0},
    {"color_jitter": True, "color_jitter_brightness": 0, "color_jitter_contrast": 0, "color_jitter_saturation": 0, "color_jitter_hue": 0.2},
    {"random_rotation": True, "rotation_degrees": 20, "rotation_prob": 1.0},
], ids=["flip", "random_crop", "brightness", "contrast", "saturation", "hue", "rotation"])
def test_each_augmentation_changes_what_the_loader_yields(records, flag):
    baseline = epochs_of(records, params())[0]
    augmented = epochs_of(records, params(**flag))
    assert any(not torch.equal(baseline, epoch) for epoch in augmented)
    assert any(not torch.equal(augmented[0], epoch) for epoch in augmented[1:])  # and differs epoch to epoch


def test_rotation_probability_zero_never_rotates(records):
    baseline = epochs_of(records, params())[0]
    assert all(torch.equal(baseline, e) for e in epochs_of(records, params(random_rotation=True, rotation_prob=0.0)))


def test_a_flipped_image_is_the_mirror_of_the_unflipped_one(records):
    baseline = epochs_of(records, params())[0]
    flipped_any = False
    for epoch in epochs_of(records, params(random_flip=True)):
        for plain, maybe in zip(baseline, epoch):
            if not torch.equal(plain, maybe):
                assert torch.equal(maybe, plain.flip(-1))
                flipped_any = True
    assert flipped_any


def test_original_size_and_crop_are_recorded_as_made(records):
    samples = training_samples(records, params(center_crop=False))
    wide = samples.records[1]["image"]
    seen_lefts = set()
    for epoch in range(6):
        samples.set_epoch(epoch)
        item = samples[1]
        assert item["original_size"].tolist() == [64, 96]
        top, left = item["crop_top_left"].tolist()
        assert top == 0 and 0 <= left <= 32
        expected = torch.tensor(list(wide.crop((left, 0, left + 64, 64)).getdata()), dtype=torch.float32)
        got = ((item["pixel_values"].permute(1, 2, 0).reshape(-1, 3) + 1) * 127.5)
        assert torch.allclose(got, expected, atol=1.0)
        seen_lefts.add(left)
    assert len(seen_lefts) > 1
    centred = training_samples(records, params(center_crop=True))[1]
    assert centred["crop_top_left"].tolist() == [0, 16]


def test_exif_orientation_is_respected_and_transparency_becomes_white(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert to_rgb(Image.open(tmp_path / "rotated.jpg")).size == (20, 40)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).mode == "RGB"


def test_image_sizes_come_from_the_headers_upright_without_decoding(tmp_path, monkeypatch):
    """Bucketing and the cache plan need every image's size before training: read it from the
    file header, turned as EXIF says, without decoding the pixels."""
    from PIL import ImageFile

    sizes = [(40, 20, 6), (30, 50, 1), (24, 24, 8)]  # width, height, EXIF orientation
    for i, (w, h, orientation) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (200, 30 * i, 90))
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(tmp_path / f"{i}.jpg", exif=exif)
        (tmp_path / f"{i}.txt").write_text("a picture")
    records = load_records(str(tmp_path), "image", "text")
    expected = [(to_rgb(records[i]["image"]).height, to_rgb(records[i]["image"]).width) for i in range(3)]
    assert expected == [(40, 20), (50, 30), (24, 24)]
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or load(self))
    assert upright_sizes(records, "image") == expected
    assert not decoded


def spy_on_step_captions(monkeypatch, tokenizer, cached: bool) -> list[str]:
    """The captions each training step is conditioned on: read from the text-embedding cache when
    it is on, decoded from what reaches the text encoder when it is off."""
    from diffusion_trainer.data.cache import TextCache

    seen: list[str] = []
    if cached:
        lookup = TextCache.__call__

        def recording_lookup(self, captions):
            seen.extend(captions)
            return lookup(self, captions)

        monkeypatch.setattr(TextCache, "__call__", recording_lookup)
    else:
        forward = CLIPTextModel.forward

        def recording_forward(self, input_ids=None, *args, **kwargs):
            seen.extend(tokenizer.decode(ids, skip_special_tokens=True) for ids in input_ids)
            return forward(self, input_ids, *args, **kwargs)

        monkeypatch.setattr(CLIPTextModel, "forward", recording_forward)
    return seen


@pytest.mark.parametrize("cached", [True, False], ids=["text-cache", "encode-per-step"])
def test_the_trigger_word_reaches_the_text_encoder(tmp_path, tiny_sd, world_folder, monkeypatch, cached):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))
    prompts = spy_on_step_captions(monkeypatch, tokenizer, cached)
    code, _ = train(tmp_path, tiny_sd, world_folder, trigger_word="sks", num_train_epochs=1,
                    cache_text_embeddings=cached)
    assert code == 0
    captions = {p.read_text().strip() for p in world_folder.glob("*.txt")}
    assert len(prompts) == 8
    assert {p.removeprefix("sks ") for p in prompts} == captions
    assert all(p.startswith("sks ") for p in prompts)


@pytest.mark.parametrize("cached", [True, False], ids=["text-cache", "encode-per-step"])
def test_caption_dropout_feeds_the_empty_caption(tmp_path, tiny_sd, world_folder, monkeypatch, cached):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))
    for rate, expect_empty in ((1.0, 8), (0.0, 0)):
        prompts = spy_on_step_captions(monkeypatch, tokenizer, cached)
        code, _ = train(tmp_path / str(rate), tiny_sd, world_folder, caption_dropout_rate=rate,
                        num_train_epochs=1, cache_text_embeddings=cached)
        assert code == 0
        assert sum(p == "" for p in prompts) == expect_empty
    prompts = spy_on_step_captions(monkeypatch, tokenizer, cached)
    code, _ = train(tmp_path / "half", tiny_sd, world_folder, caption_dropout_rate=0.5, num_train_epochs=6,
                    cache_text_embeddings=cached)
    assert 0.25 < sum(p == "" for p in prompts) / len(prompts) < 0.75


def test_every_dataset_layout_loads(tmp_path, star_folder, star_imagefolder):
    as_folder = load_records(str(star_folder), "image", "text")
    as_imagefolder = load_records(str(star_imagefolder), "image", "text")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": as_imagefolder}).save_to_disk(str(saved))
    as_saved = load_records(str(saved), "image", "text")
    plain_saved = tmp_path / "plain_saved"
    as_folder.save_to_disk(str(plain_saved))
    for loaded in (as_folder, as_imagefolder, as_saved, load_records(str(plain_saved), "image", "text")):
        assert len(loaded) == 8 and {"image", "text"} <= set(loaded.column_names)
        assert isinstance(loaded[0]["image"], Image.Image) and "star" in loaded[0]["text"]


def test_a_lab_dataset_id_is_found_in_the_workspace(tmp_path, star_imagefolder):
    import shutil

    shutil.copytree(star_imagefolder, tmp_path / "datasets" / "my_stars")
    from diffusion_trainer.lab.datasets import resolve_dataset_name

    assert len(load_records(resolve_dataset_name("my_stars", tmp_path / "datasets"), "image", "text")) == 8


def test_images_without_captions_are_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(InputError, match=r"lonely.png needs lonely.txt.*set default_caption .* or trigger_word"):
        load_records(str(tmp_path), "image", "text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        load_records(str(tmp_path / "empty"), "image", "text")


def test_an_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(InputError, match="dataset_name: could not load 'nobody/nothing' from the hub"):
        load_records("nobody/nothing", "image", "text")


def test_metadata_captions_keep_their_column_names(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "hello"}) + "\n")
    with pytest.raises(InputError, match=r"caption_column: 'text' is not a column .* columns are: image, prompt"):
        load_records(str(tmp_path), "image", "text")
    assert load_records(str(tmp_path), "image", "prompt")[0]["prompt"] == "hello"


# --- Images without caption files (issue 20) -----------------------------------------------

def photos(folder, captions: dict[str, str | None], extension: str = ".txt"):
    """One small image per name; a caption file with `extension` for those whose caption is not None."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", (8, 8), (40 * n, 90, 200)).save(folder / f"{name}.png")
        if caption is not None:
            (folder / f"{name}{extension}").write_text(caption + "\n")
    return folder


def captions_trained(folder, **values) -> tuple[list[str], list[str]]:
    """(each image's training caption, trigger word in, in file order; the loader's notes)."""
    p = params(**values)
    notes: list[str] = []
    records = load_records(str(folder), "image", "text", caption_extension=p.caption_extension,
                           default_caption=p.default_caption, trigger_word=p.trigger_word, notes=notes)
    return training_samples(records, p).captions, notes


def test_images_without_a_caption_file_get_default_caption_behind_the_trigger_word(tmp_path):
    folder = photos(tmp_path / "mixed", {"a": "a red square", "b": None, "c": "a blue sks circle", "d": None})
    captions, notes = captions_trained(folder, default_caption="a photo", trigger_word="sks")
    assert captions == ["sks a red square", "sks a photo", "a blue sks circle", "sks a photo"]
    assert notes == ["Captions: 2 from .txt files, 2 from default_caption."]
    recorded = {"dataset_name": str(folder), "image_column": "image", "caption_column": "text",
                "trigger_word": "sks", "default_caption": "a photo"}  # an exported adapter's tags read the same
    assert training_captions(recorded) == captions


def test_with_only_a_trigger_word_every_uncaptioned_image_is_captioned_by_it_once(tmp_path):
    folder = photos(tmp_path / "bare", {"a": None, "b": None, "c": None})
    captions, notes = captions_trained(folder, trigger_word="sks")
    assert captions == ["sks", "sks", "sks"]
    assert notes == ["Captions: 3 from trigger_word."]


def test_default_caption_holding_the_trigger_word_does_not_get_it_twice(tmp_path):
    folder = photos(tmp_path / "bare", {"a": None})
    assert captions_trained(folder, default_caption="a photo of sks", trigger_word="sks")[0] == ["a photo of sks"]


def test_uncaptioned_images_without_default_caption_or_trigger_word_are_refused_by_the_command(
        tmp_path, tiny_sd, capsys):
    folder = photos(tmp_path / "bare", {"a": "a red square", "b": None})
    code, _ = train(tmp_path, tiny_sd, folder)
    err = capsys.readouterr().err
    assert code == 2
    assert "1 image(s)" in err and "b.png needs b.txt" in err
    assert "default_caption" in err and "trigger_word" in err


def test_caption_extension_caption_reads_caption_files_and_not_txt(tmp_path):
    folder = photos(tmp_path / "kohya", {"a": "from the caption file", "b": None}, extension=".caption")
    (folder / "a.txt").write_text("from the txt file")
    (folder / "b.txt").write_text("from the txt file")
    captions, notes = captions_trained(folder, caption_extension=".caption", default_caption="a photo")
    assert captions == ["from the caption file", "a photo"]
    assert notes == ["Captions: 1 from .caption files, 1 from default_caption."]
    assert captions_trained(folder)[0] == ["from the txt file", "from the txt file"]  # the default: .txt


def test_caption_files_of_the_other_extension_are_pointed_at(tmp_path):
    folder = photos(tmp_path / "kohya", {"a": "a caption"}, extension=".caption")
    with pytest.raises(InputError, match=r"a.png needs a.txt beside it; the folder has .caption files: set "
                                         r"caption_extension to '.caption'"):
        load_records(str(folder), "image", "text")


def test_a_caption_extension_other_than_txt_or_caption_is_refused_by_name(tmp_path, tiny_sd, capsys):
    with pytest.raises(ParamsError, match=r"caption_extension: must be '.txt' or '.caption' \(got '.md'\)"):
        params(caption_extension=".md")
    assert params(caption_extension=".CAPTION").caption_extension == ".caption"  # the Lab's form, any case
    code, _ = train(tmp_path, tiny_sd, tmp_path, caption_extension="caption")
    assert code == 2 and "caption_extension: must be '.txt' or '.caption'" in capsys.readouterr().err


def test_a_run_on_a_half_captioned_folder_trains_and_counts_its_captions(tmp_path, tiny_sd, star_folder, capsys):
    folder = tmp_path / "half"
    shutil.copytree(star_folder, folder)
    for caption in sorted(folder.glob("*.txt"))[::2]:
        caption.unlink()
    code, out = train(tmp_path, tiny_sd, folder, default_caption="a purple star", trigger_word="sks",
                      num_train_epochs=1)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Captions: 4 from .txt files, 4 from default_caption." in err
    assert "Training 8 images" in err
    assert (out / "test_lora" / "pytorch_lora_weights.safetensors").is_file()
