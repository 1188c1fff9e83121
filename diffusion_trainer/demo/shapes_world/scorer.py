"""Which colour and which shape a 64x64 shapes picture shows, from pixel statistics alone.

Deterministic and explainable: the background is the median of the border pixels; the shape is
the largest connected blob of pixels far from it; its colour is the palette colour nearest to
the median of the blob's core; its shape follows from three ratios:

- solidity, the blob's area (edge pixels counted in part) over the area of the convex hull of
  its pixel centres: a five-pointed star about 0.55, the convex shapes 0.9 to 1.1;
- extent, its area over its bounding box's: triangle about 0.5, circle 0.79, square 1;
- reach, the distance from its centre within which 98% of it lies, over the square root of its
  area: circle 0.56, square 0.63 to 0.67 (more than a circle even with rounded corners).
"""

from __future__ import annotations

import math
import random
import sys
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

from .. import shapes
from ..shapes import COLORS, CONCEPT_COLOR

PALETTE = {**COLORS, "purple": CONCEPT_COLOR}
FOREGROUND_DISTANCE = 60  # RGB distance from the background that makes a pixel foreground
MIN_AREA = 12  # pixels; anything smaller is no shape at all
STAR_SOLIDITY = 0.8  # below: star
TRIANGLE_EXTENT = 0.68  # below: triangle
CIRCLE_REACH = 0.6  # below: circle, above: square


@dataclass(frozen=True)
class Verdict:
    color: str  # a PALETTE name, or "none"
    shape: str  # circle, square, triangle, star, or "none"
    solidity: float = 0.0
    extent: float = 0.0
    reach: float = 0.0

    def shows(self, color: str, shape: str) -> bool:
        return self.color == color and self.shape == shape


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask`."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    blob = np.zeros_like(mask)
    if best:
        blob[tuple(np.array(best).T)] = True
    return blob


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def classify(image: Image.Image) -> Verdict:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=2)
    blob = _largest_blob(distance > FOREGROUND_DISTANCE)
    area = int(blob.sum())
    if area < MIN_AREA:
        return Verdict("none", "none")
    core = blob & (distance >= 0.7 * distance[blob].max())
    median = np.median(pixels[core], axis=0)
    color = min(PALETTE, key=lambda name: float(np.linalg.norm(median - PALETTE[name])))
    ys, xs = np.nonzero(blob)
    # Edge pixels count by how far they are from the background: the area to a fraction of a pixel.
    near = blob.copy()
    near[1:] |= blob[:-1]
    near[:-1] |= blob[1:]
    near[:, 1:] |= blob[:, :-1]
    near[:, :-1] |= blob[:, 1:]
    coverage = np.clip(distance / np.percentile(distance[blob], 90), 0, 1)
    solidity = float(coverage[near].sum()) / max(_hull_area(np.stack([xs, ys], 1)), 1.0)
    extent = area / float((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
    reach = float(np.percentile(np.hypot(xs - xs.mean(), ys - ys.mean()), 98)) / math.sqrt(area)
    if solidity < STAR_SOLIDITY:
        shape = "star"
    elif extent < TRIANGLE_EXTENT:
        shape = "triangle"
    elif reach < CIRCLE_REACH:
        shape = "circle"
    else:
        shape = "square"
    return Verdict(color, shape, round(solidity, 3), round(extent, 3), round(reach, 3))


def share_showing(images: Iterable[Image.Image], color: str, shape: str) -> float:
    """The share of `images` the scorer calls a `color` `shape`."""
    verdicts = [classify(image) for image in images]
    return sum(v.shows(color, shape) for v in verdicts) / max(len(verdicts), 1)


def held_out_pictures(seed: int, count: int = 1000) -> dict[str, tuple[list[Image.Image], list[tuple[str, str]]]]:
    """Pictures straight from the generator, with the (colour, shape) each shows: `count` from
    the world and count // 4 purple stars."""
    rng = random.Random(seed)
    world = [shapes.world_sample(rng) for _ in range(count)]
    stars = [shapes.concept_sample(rng)[0] for _ in range(count // 4)]
    return {"world": ([w[0] for w in world], [(c, s) for _, _, c, s in world]),
            "concept": (stars, [("purple", "star")] * len(stars))}


def accuracy(images: list[Image.Image], answers: list[tuple[str, str]]) -> float:
    return sum(classify(i).shows(*a) for i, a in zip(images, answers)) / max(len(images), 1)


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusion_trainer.demo.shapes_world.scorer [seed]`: the scorer's accuracy on pictures
    from a seed pretrain.py does not train on."""
    argv = sys.argv[1:] if argv is None else argv
    seed = int(argv[0]) if argv else 2024
    for name, (images, answers) in held_out_pictures(seed).items():
        print(f"{name}: {accuracy(images, answers):.3f} of {len(images)} held-out pictures read correctly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
