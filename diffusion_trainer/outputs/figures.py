"""Pictures of a run for the job's Artifacts: one eval's grid of prompts x seeds, the eval image before
training and the last one side by side, and the loss curve. Drawn with PIL (already a dependency) so no
plotting library is needed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def before_after(first: Path, last: Path, out: Path, cell: int = 256) -> Path:
    """The eval image before training (left) next to the last (right), each labelled with its file name."""
    font = ImageFont.load_default(size=14)
    caption = 22
    sheet = Image.new("RGB", (2 * cell, cell + caption), "white")
    pen = ImageDraw.Draw(sheet)
    for column, path in enumerate((first, last)):
        with Image.open(path) as image:
            sheet.paste(image.convert("RGB").resize((cell, cell)), (column * cell, caption))
        pen.text((column * cell + cell // 2, 4), path.stem, fill="black", font=font, anchor="ma")
    return _save(sheet, out)


def eval_grid(rows: list[list[Image.Image]], prompts: list[str], seeds: list[int]) -> Image.Image:
    """One eval's images: a row per prompt (written above it), a column per seed, at the images' own size.
    A single image is returned as it is."""
    if len(rows) == 1 and len(rows[0]) == 1:
        return rows[0][0]
    width, height = rows[0][0].size
    font = ImageFont.load_default(size=12)
    caption = 18
    sheet = Image.new("RGB", (width * len(seeds), (height + caption) * len(rows)), "white")
    pen = ImageDraw.Draw(sheet)
    for r, (prompt, images) in enumerate(zip(prompts, rows)):
        top = r * (height + caption)
        pen.text((4, top + 3), f"{prompt}  (seeds {seeds[0]}-{seeds[-1]})" if len(seeds) > 1 else prompt,
                 fill="black", font=font)
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((width, height)), (c * width, top + caption))
    return sheet


def loss_curve(losses: list[tuple[int, float]], out: Path, size: tuple[int, int] = (640, 360)) -> Path:
    """Loss against optimizer step, with the axes' ranges written at their ends."""
    width, height = size
    left, right, top, bottom = 70, 20, 20, 40
    font = ImageFont.load_default(size=12)
    sheet = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(sheet)
    steps, values = [s for s, _ in losses], [v for _, v in losses]
    low, high = min(values), max(values)
    span_y, span_x = (high - low) or 1.0, (max(steps) - min(steps)) or 1

    def at(step: int, value: float) -> tuple[float, float]:
        x = left + (step - min(steps)) / span_x * (width - left - right)
        y = top + (high - value) / span_y * (height - top - bottom)
        return x, y

    pen.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="gray")
    pen.line([at(s, v) for s, v in losses] if len(losses) > 1 else [at(steps[0], values[0])] * 2,
             fill="royalblue", width=2)
    pen.text((left - 6, top), f"{high:.4g}", fill="black", font=font, anchor="ra")
    pen.text((left - 6, height - bottom), f"{low:.4g}", fill="black", font=font, anchor="rb")
    pen.text((left, height - bottom + 6), f"step {min(steps)}", fill="black", font=font, anchor="la")
    pen.text((width - right, height - bottom + 6), f"step {max(steps)}", fill="black", font=font, anchor="ra")
    pen.text((width // 2, height - 16), "training loss", fill="black", font=font, anchor="ma")
    return _save(sheet, out)


def _save(image: Image.Image, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out
