"""Caption tags: shuffle_caption, keep_tokens and caption_tag_dropout_rate, from the pure function
to what a training step is conditioned on (with and without the text cache)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import train

from diffusion_trainer.data.captions import shuffled_tags
from diffusion_trainer.families.sd import StableDiffusion
from diffusion_trainer.params import ParamsError, parse_params

CAPTION = "sks star, purple, five points, plain background, small, centred, sharp"
TAGS = CAPTION.removeprefix("sks ").split(", ")  # 'star' counts as the first tag after the trigger


def draws(caption: str, seeds=range(8), **kwargs) -> list[str]:
    return [shuffled_tags(caption, generator=torch.Generator().manual_seed(s), **kwargs) for s in seeds]


def test_kept_tags_and_the_trigger_word_stay_in_place_and_the_rest_are_permuted():
    results = draws(CAPTION, keep=2, trigger_word="sks")
    for result in results:
        assert result.startswith("sks star, purple, ")
        tags = result.removeprefix("sks ").split(", ")
        assert tags[:2] == TAGS[:2] and sorted(tags[2:]) == sorted(TAGS[2:])
    assert len(set(results)) > 1 and any(r != CAPTION for r in results)


def test_the_trigger_word_stays_first_even_when_no_tag_is_kept():
    results = draws(CAPTION, keep=0, trigger_word="sks")
    assert all(r.startswith("sks ") and sorted(r.removeprefix("sks ").split(", ")) == sorted(TAGS) for r in results)
    assert any(not r.startswith("sks star") for r in results)  # the tag the trigger word was put before moves
    assert all(r.startswith("sks, ") for r in draws("sks, red, green, blue", keep=0, trigger_word="sks"))


def test_without_a_trigger_word_every_tag_after_keep_tokens_moves():
    results = draws("red, green, blue, white", keep=0)
    assert all(sorted(r.split(", ")) == ["blue", "green", "red", "white"] for r in results)
    assert len({r.split(", ")[0] for r in results}) > 1  # the first tag is not held when keep_tokens is 0


def test_tag_dropout_drops_every_tag_but_the_kept_ones_at_1_and_none_at_0():
    assert set(draws(CAPTION, keep=1, trigger_word="sks", drop_rate=1.0, shuffle=False)) == {"sks star"}
    assert set(draws(CAPTION, keep=0, trigger_word="sks", drop_rate=1.0)) == {"sks"}
    assert set(draws(CAPTION, keep=0, trigger_word="sks", drop_rate=0.0, shuffle=False)) == {CAPTION}
    half = draws(CAPTION, seeds=range(40), trigger_word="sks", drop_rate=0.5, shuffle=False)
    kept = sum(len(r.removeprefix("sks ").split(", ")) for r in half) / (40 * len(TAGS))
    assert 0.3 < kept < 0.7 and all(r.startswith("sks ") for r in half)


def test_the_same_seed_draws_the_same_caption():
    assert draws(CAPTION, keep=1, trigger_word="sks", drop_rate=0.3) == \
        draws(CAPTION, keep=1, trigger_word="sks", drop_rate=0.3)


@pytest.mark.parametrize("values, field", [({"keep_tokens": -1}, "keep_tokens"),
                                           ({"caption_tag_dropout_rate": 2}, "caption_tag_dropout_rate"),
                                           ({"shuffle_caption": "maybe"}, "shuffle_caption")])
def test_bad_values_are_refused_naming_the_field(values, field):
    with pytest.raises(ParamsError) as caught:
        parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d", **values})
    assert any(p.startswith(f"{field}:") for p in caught.value.problems)


def test_the_defaults_leave_captions_alone():
    params, _ = parse_params({"adaptor_name": "a", "model_name": "m/m", "dataset_name": "d"})
    assert (params.shuffle_caption, params.keep_tokens, params.caption_tag_dropout_rate) == (False, 0, 0.0)


@pytest.fixture
def tagged_folder(tmp_path, star_folder):
    """The star pictures, each captioned with comma-separated tags."""
    folder = tmp_path / "tagged"
    shutil.copytree(star_folder, folder)
    for caption in folder.glob("*.txt"):
        caption.write_text(CAPTION.removeprefix("sks "))  # the trigger word is put in front by the trainer
    return folder


def spy_on_encoded_captions(monkeypatch) -> list[str]:
    seen: list[str] = []
    encode = StableDiffusion.encode_prompts

    def recording_encode(self, prompts):
        seen.extend(prompts)
        return encode(self, prompts)

    monkeypatch.setattr(StableDiffusion, "encode_prompts", recording_encode)
    return seen


@pytest.mark.parametrize("cached", [False, True], ids=["encode-per-step", "text-cache"])
def test_a_run_with_shuffled_tags_trains_on_shuffled_captions(tmp_path, tiny_sd, tagged_folder, monkeypatch,
                                                              capsys, cached):
    seen = spy_on_encoded_captions(monkeypatch)
    code, out = train(tmp_path, tiny_sd, tagged_folder, trigger_word="sks", shuffle_caption=True, keep_tokens=1,
                      caption_tag_dropout_rate=0.2, cache_text_embeddings=cached, num_train_epochs=2)
    assert code == 0 and (out / "test_lora" / "pytorch_lora_weights.safetensors").is_file()
    drawn = [c for c in seen if c and c != CAPTION]
    assert drawn, "no step saw a shuffled caption"
    for caption in drawn:
        tags = caption.removeprefix("sks ").split(", ")
        assert caption.startswith("sks star") and set(tags) <= set(TAGS)
    if cached:
        assert "encoded as drawn" in capsys.readouterr().err
