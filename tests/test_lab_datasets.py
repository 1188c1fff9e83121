"""Datasets as the Lab stores them under <workspace>/datasets/<id>/."""

from __future__ import annotations

import json
import random

import pytest

from diffusion_trainer.data.sources import load_records
from diffusion_trainer.demo import shapes
from diffusion_trainer.errors import InputError
from diffusion_trainer.lab.datasets import resolve_dataset_name


def write_images(folder, n, rng, file_prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, caption = shapes.concept_sample(rng, "sks")
        image.save(folder / f"{file_prefix}{i}.png")
        rows.append({"file_name": f"{file_prefix}{i}.png", "text": caption})
    return rows


def write_metadata(folder, rows):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metadata_under_train_is_read(tmp_path):
    rng = random.Random(0)
    train = tmp_path / "lab_dataset" / "train"
    write_metadata(train, write_images(train, 3, rng))
    records = load_records(resolve_dataset_name("lab_dataset", tmp_path), "image", "text")
    assert len(records) == 3 and all("sks" in caption for caption in records["text"])


def test_metadata_in_each_label_folder_under_train_is_read(tmp_path):
    rng = random.Random(1)
    root = tmp_path / "labelled"
    for label in ("stars", "more_stars"):
        folder = root / "train" / label
        write_metadata(folder, write_images(folder, 2, rng))
    records = load_records(str(root), "image", "text")
    assert len(records) == 4 and all("sks" in caption for caption in records["text"])


def test_a_hub_dataset_folder_holding_only_the_labs_index_json_is_loaded_by_its_id(tmp_path):
    folder = tmp_path / "someone_stars"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"dataset_id": "someone/stars", "location": "huggingface",
                                                   "description": "", "size": -1, "json_data": {}}))
    with pytest.raises(InputError) as caught:  # offline here: the hub is asked for that id
        load_records(resolve_dataset_name("someone_stars", tmp_path), "image", "text")
    assert "could not load 'someone/stars' from the hub" in str(caught.value)
