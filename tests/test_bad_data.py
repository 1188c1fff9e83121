"""Bad data is caught before training and named; odd image modes convert with the right pixels."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from conftest import train
from PIL import Image

from diffusion_trainer.data.images import to_rgb


def reopened(image: Image.Image, fmt: str = "PNG", **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    buffer.seek(0)
    return Image.open(buffer)


def png_rgb16(rgb: tuple[int, int, int], size: int = 4) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    row = b"\x00" + struct.pack(">HHH", *rgb) * size
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size))
            + chunk(b"IEND", b""))


def pixel(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(to_rgb(image))[0, 0])


def test_16_bit_palette_cmyk_gray_and_alpha_images_keep_their_colours():
    gray16 = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # 0x8080: mid-grey, not white
    assert pixel(reopened(gray16)) == (128, 128, 128)
    assert pixel(Image.open(io.BytesIO(png_rgb16((65535, 32896, 0))))) == (255, 128, 0)
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 1)
    assert pixel(reopened(palette)) == (200, 100, 50)
    assert pixel(reopened(palette, transparency=1)) == (255, 255, 255)  # transparent: over white
    assert pixel(reopened(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100)) == (255, 0, 0)
    assert pixel(reopened(Image.new("L", (4, 4), 77))) == (77, 77, 77)
    assert pixel(reopened(Image.new("LA", (4, 4), (100, 0)))) == (255, 255, 255)
    assert pixel(reopened(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))) == (127, 127, 127)


@pytest.fixture
def damaged_folder(tmp_path, star_folder):
    """The star folder plus one of each kind of bad file."""
    folder = tmp_path / "damaged"
    shutil.copytree(star_folder, folder)
    good = (folder / sorted(p.name for p in folder.glob("*.png"))[0]).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "not_an_image.png").write_text("hello")
    big = io.BytesIO()
    Image.new("1", (12000, 12000)).save(big, format="PNG")  # 144 megapixels, a few KB on disk
    (folder / "huge.png").write_bytes(big.getvalue())
    (folder / "latin1.png").write_bytes(good)
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    for name in ("truncated", "not_an_image", "huge"):
        (folder / f"{name}.txt").write_text("a caption")
    return folder


def test_every_bad_file_is_named_in_one_report_before_the_model_loads(tmp_path, tiny_sd, damaged_folder, capsys):
    code, out = train(tmp_path, tiny_sd, damaged_folder)
    err = capsys.readouterr().err
    assert code == 2
    for name in ("truncated.png", "not_an_image.png", "huge.png: oversized", "latin1.txt: caption is not UTF-8"):
        assert name in err
    assert "skip_bad_images" in err and "Loading" not in err


def test_skip_bad_images_trains_on_the_rest_and_lists_what_it_left_out(tmp_path, tiny_sd, damaged_folder, capsys):
    code, out = train(tmp_path, tiny_sd, damaged_folder, skip_bad_images=True, cache_latents=False,
                      num_train_epochs=1)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "training without 4 unusable" in err and "truncated.png" in err
    assert "Training 8 images" in err


def test_metadata_rows_that_are_not_json_or_name_no_file_are_named(tmp_path, tiny_sd, star_imagefolder, capsys):
    folder = tmp_path / "meta"
    shutil.copytree(star_imagefolder, folder)
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("{not json\n" + json.dumps({"text": "no file"}) + "\n")
    code, _ = train(tmp_path, tiny_sd, folder)
    err = capsys.readouterr().err
    assert code == 2 and "metadata.jsonl line 9: not valid JSON" in err and "line 10: no file_name" in err


def test_symlinks_out_of_the_dataset_are_refused_unless_allowed(tmp_path, tiny_sd, star_folder, capsys):
    folder = tmp_path / "linked"
    shutil.copytree(star_folder, folder)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(outside)
    (folder / "link.png").symlink_to(outside)
    (folder / "link.txt").write_text("a link")
    code, _ = train(tmp_path / "refused", tiny_sd, folder)
    assert code == 2 and "link.png: leads outside the dataset folder" in capsys.readouterr().err
    code, _ = train(tmp_path / "allowed", tiny_sd, folder, allow_files_outside_dataset=True, num_train_epochs=1)
    assert code == 0


def test_captions_longer_than_the_text_encoder_window_are_reported_once(tmp_path, tiny_sd, star_folder, capsys):
    folder = tmp_path / "long"
    shutil.copytree(star_folder, folder)
    for caption in sorted(folder.glob("*.txt"))[:3]:
        caption.write_text("a purple star " * 40)
    code, _ = train(tmp_path, tiny_sd, folder, num_train_epochs=1)
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("longer than") == 1 and "3 of 8 captions are longer than tokenizer's 77 tokens" in err
