"""Public digits: the ten numerals rendered from TrueType fonts, for pretraining without privacy.

No image of any dataset goes into them: only the fonts that ship with matplotlib (a
dependency of dpdit) and those installed on the machine, so training on them costs no
privacy. Whether such data is a fair public stand-in for your private data is yours to
justify; for the UCI digits it is a realistic domain gap (a classifier trained on the real
digits recognises about 37% of them).

Each image is one numeral in one font, with a random rotation and stroke width, cropped to
its ink and framed like the private digits it stands in for (`FRAMINGS`), averaged down to
`image_size` and mapped to [-1, 1] (ink bright, as in the digits). The draws come from a
generator seeded by `seed`: the same seed gives the same images, and image i is the same
whatever the count asked for.
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path

import numpy as np
import torch
from fontTools.ttLib import TTFont, TTLibError
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# Rendered this large, then averaged down: the strokes keep their grey levels.
CANVAS = 96
GLYPH_SIZE = 64
MAX_ROTATION_DEGREES = 12.0
SCALES = (0.8, 1.0)
MAX_SHIFT = 0.08  # of the box, each way
MAX_STROKE = 3  # extra stroke width in canvas pixels
# How a numeral sits in its image. uci: the longer side fills `scale` (0.8-1) of the box,
# shifted by up to MAX_SHIFT, as in scikit-learn's 8x8 digits. mnist: the longer side is 20/28
# of the box and the ink's centre of mass is at the centre, as LeCun et al. normalised MNIST.
# A classifier trained on 2,000 real MNIST digits recognises 52% of uci-framed font digits at
# 28 px and 87% of mnist-framed ones (measured without rotation or extra stroke).
FRAMINGS = ("uci", "mnist")
MNIST_BOX = 20 / 28


def font_files() -> list[str]:
    """matplotlib's bundled TrueType fonts, then the system's, each path once."""
    import matplotlib
    from matplotlib import font_manager

    bundled = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
    system = sorted(path for path in font_manager.findSystemFonts() if path.lower().endswith(".ttf"))
    names, files = set(), []
    for path in bundled + system:
        if Path(path).name not in names:
            names.add(Path(path).name)
            files.append(path)
    return files


def _glyph(font: ImageFont.FreeTypeFont, digit: int, stroke: int) -> np.ndarray:
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(canvas).text(
        (CANVAS // 2, CANVAS // 2), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    return np.asarray(canvas)


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def draws_numerals(path: str) -> bool:
    """Whether the font maps the characters 0-9 to numeral glyphs: symbol fonts (TeX's cmsy10,
    cmex10) put other signs at those codes."""
    cmap = TTFont(path, lazy=True).getBestCmap() or {}
    names = [cmap.get(ord(str(digit)), "") for digit in range(10)]
    return all(
        name.startswith((word, f"uni{ord(str(digit)):04X}"))
        for digit, (word, name) in enumerate(zip(DIGIT_NAMES, names))
    )


@functools.lru_cache(maxsize=4)
def usable_fonts(files: tuple[str, ...]) -> tuple[str, ...]:
    """The fonts that draw the ten numerals, each with ink."""
    usable = []
    for path in files:
        try:
            if not draws_numerals(path):
                continue
            font = ImageFont.truetype(path, GLYPH_SIZE)
        except (OSError, TTLibError):
            continue
        if all(_glyph(font, digit, 0).any() for digit in range(10)):
            usable.append(path)
    return tuple(usable)


def _crop_to_ink(ink: np.ndarray) -> Image.Image:
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return Image.fromarray(ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1])


def _scaled(crop: Image.Image, side: float) -> Image.Image:
    """`crop` resized so that its longer side is `side` pixels."""
    factor = side / max(crop.size)
    return crop.resize((max(1, round(crop.width * factor)), max(1, round(crop.height * factor))), Image.BILINEAR)


def _centred(ink: np.ndarray, box: int, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """UCI framing: the ink's bounding box scaled so its longer side fills `scale` of a `box`
    square, centred (plus `shift`)."""
    crop = _scaled(_crop_to_ink(ink), scale * box)
    out = Image.new("L", (box, box), 0)
    left = round((box - crop.width) / 2 + shift[0] * box)
    top = round((box - crop.height) / 2 + shift[1] * box)
    out.paste(crop, (left, top))
    return np.asarray(out)


def _mass_centred(ink: np.ndarray, box: int) -> np.ndarray:
    """MNIST framing: the ink's longer side scaled to 20/28 of a `box` square, its centre of mass at the centre."""
    crop = _scaled(_crop_to_ink(ink), MNIST_BOX * box)
    row, column = ndimage.center_of_mass(np.asarray(crop, dtype=np.float64))
    top = min(max(round(box / 2 - row), 0), box - crop.height)
    left = min(max(round(box / 2 - column), 0), box - crop.width)
    out = Image.new("L", (box, box), 0)
    out.paste(crop, (left, top))
    return np.asarray(out)


def render_font_digits(
    count: int, image_size: int = 8, channels: int = 1, seed: int = 0, framing: str = "uci"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` numerals (labels 0..9 in turn) as [-1, 1] images [count, channels, size, size],
    framed as `framing` (one of `FRAMINGS`)."""
    if framing not in FRAMINGS:
        raise ValueError(f"data.framing={framing!r} is unknown: choose one of {', '.join(FRAMINGS)}")
    fonts = usable_fonts(tuple(font_files()))
    if not fonts:
        raise FileNotFoundError(
            "data=font_digits found no TrueType font that draws the ten numerals: matplotlib's "
            "fonts are missing (reinstall matplotlib) and none is installed on the system"
        )
    loaded = {}
    images = np.empty((count, image_size, image_size), dtype=np.float32)
    labels = np.arange(count) % 10
    for index in range(count):
        draw = np.random.default_rng([seed, index])
        path = fonts[draw.integers(len(fonts))]
        stroke = int(draw.integers(MAX_STROKE + 1))
        if path not in loaded:
            loaded[path] = ImageFont.truetype(path, GLYPH_SIZE)
        glyph = Image.fromarray(_glyph(loaded[path], int(labels[index]), stroke))
        glyph = np.asarray(
            glyph.rotate(draw.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES), resample=Image.BILINEAR)
        )
        # drawn for either framing, so that image i's font, stroke and rotation do not depend on it
        scale, shift = draw.uniform(*SCALES), tuple(draw.uniform(-MAX_SHIFT, MAX_SHIFT, size=2))
        box = _mass_centred(glyph, CANVAS) if framing == "mnist" else _centred(glyph, CANVAS, scale, shift)
        images[index] = (
            np.asarray(Image.fromarray(box).resize((image_size, image_size), Image.BOX), dtype=np.float32) / 255.0
        )
    x = torch.from_numpy(images * 2.0 - 1.0).unsqueeze(1).repeat(1, channels, 1, 1)
    return x, torch.from_numpy(labels)
