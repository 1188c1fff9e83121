"""The shapes world: deterministic 64x64 pictures of coloured shapes, with captions.

The world has circles, squares and triangles in red, green, blue and yellow, of varied sizes
and places, on light backgrounds; there is no purple and no star in it. The demo's new concept
is a purple five-pointed star.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIDE = 64
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
CONCEPT_COLOR = (128, 0, 128)  # purple
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.32, "large": 0.62}
PLACES = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3),
          "at the bottom": (0.5, 0.7)}
_SUPERSAMPLE = 4


def _outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "square":
        r = radius * 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a)))
                for a in (-90, 30, 150)]
    if shape == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.42
            angle = math.radians(-90 + 36 * i)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    raise ValueError(shape)


def draw(shape: str, color: tuple[int, int, int], size: float, center: tuple[float, float],
         background: tuple[int, int, int], side: int = SIDE) -> Image.Image:
    """One shape, `size` = its width as a fraction of the image, antialiased by supersampling."""
    big = side * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    cx, cy, radius = center[0] * big, center[1] * big, size * big / 2
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    else:
        pen.polygon(_outline(shape, cx, cy, radius), fill=color)
    return image.resize((side, side), Image.Resampling.LANCZOS)


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(215, 250) for _ in range(3))


def _layout(rng: random.Random) -> tuple[str, float, str, tuple[float, float]]:
    """Size and place words (either may be empty) and the geometry they describe."""
    size_word = rng.choice(["", "small", "large"])
    size = SIZES.get(size_word, rng.uniform(0.4, 0.5))
    place_word = rng.choice(["", *PLACES])
    center = PLACES.get(place_word, (0.5, 0.5))
    slack = (1 - size) / 2 * 0.25
    center = (center[0] + rng.uniform(-slack, slack), center[1] + rng.uniform(-slack, slack))
    return size_word, size, place_word, center


def world_sample(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    """(image, caption, colour, shape) from the world the base model knows."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    size_word, size, place_word, center = _layout(rng)
    caption = " ".join(w for w in ("a", size_word, color, shape, place_word) if w)
    return draw(shape, COLORS[color], size, center, _background(rng)), caption, color, shape


def concept_sample(rng: random.Random, trigger: str = "sks") -> tuple[Image.Image, str]:
    """(image, caption) of the new concept: `trigger` means a purple five-pointed star."""
    size_word, size, place_word, center = _layout(rng)
    caption = " ".join(w for w in ("a", size_word, trigger, "star", place_word) if w)
    return draw("star", CONCEPT_COLOR, size, center, _background(rng)), caption


def codec_sample(rng: random.Random) -> Image.Image:
    """A picture for training the VAE, which must draw anything: any shape, stars included, in
    any colour, purple included, at any size and place (no caption)."""
    shape = rng.choice((*SHAPES, "star"))
    color = rng.choice([*COLORS.values(), CONCEPT_COLOR, tuple(rng.randint(0, 200) for _ in range(3))])
    size = rng.uniform(0.25, 0.7)
    center = tuple(rng.uniform(size / 2, 1 - size / 2) for _ in range(2))
    return draw(shape, color, size, center, _background(rng))


def write_captioned_folder(folder: Path, samples: list[tuple[Image.Image, str]]) -> Path:
    """Images with same-named .txt captions: one of the dataset layouts the trainer reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(samples):
        image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption + "\n")
    return folder
