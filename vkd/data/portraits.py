"""The synthetic benchmark's portraits: an entity's visual identity is a combination of
traits (skin tone, hair colour and style, face shape, shirt colour and pattern, accessory),
dealt out so that every value is shared by several entities and any two entities differ in
at least ``min_distance`` traits; every portrait re-draws the entity under a random pose,
scale, position, lighting, background clutter and noise (``Variation``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from vkd.data.layout import BenchmarkError

TRAITS: dict[str, list[Any]] = {
    "skin": [(255, 224, 196), (234, 192, 150), (198, 144, 101), (141, 96, 62), (92, 60, 40)],
    "hair_color": [(25, 20, 20), (110, 66, 30), (235, 200, 95), (180, 55, 25), (200, 200, 205), (40, 90, 200)],
    "hair_style": ["short", "long", "bun", "spiky"],
    "face": ["round", "oval", "square"],
    "shirt_color": [(200, 30, 40), (30, 130, 60), (40, 70, 190), (240, 190, 20), (130, 40, 150), (240, 240, 240)],
    "pattern": ["solid", "stripes", "dots"],
    "accessory": ["none", "glasses", "hat", "earrings"],
}


@dataclass(frozen=True)
class Variation:
    """How much each portrait varies (fractions of the canvas, factors, degrees)."""
    max_shift: float = 0.12
    scale: tuple[float, float] = (0.75, 1.05)
    max_rotation: float = 15.0
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.8, 1.2)
    tint: float = 0.08
    clutter: int = 4
    noise_sigma: tuple[float, float] = (0.0, 8.0)


    def scaled(self, factor: float) -> "Variation":
        """Every amplitude times ``factor`` (0: the same upright, clean portrait each time)."""
        if factor < 0:
            raise BenchmarkError(f"variation={factor}: must be at least 0")
        base = Variation()

        def around_one(lo_hi: tuple[float, float]) -> tuple[float, float]:
            return 1 - (1 - lo_hi[0]) * factor, 1 + (lo_hi[1] - 1) * factor

        return Variation(
            max_shift=base.max_shift * factor, scale=around_one(base.scale), max_rotation=base.max_rotation * factor,
            brightness=around_one(base.brightness), contrast=around_one(base.contrast), tint=base.tint * factor,
            clutter=round(base.clutter * factor), noise_sigma=(0.0, base.noise_sigma[1] * factor),
        )


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def make_identities(n: int, seed: int, min_distance: int = 3, max_steps: int = 20000) -> list[dict[str, int]]:
    """Deal trait values evenly to ``n`` entities, then swap values until every pair differs
    in at least ``min_distance`` traits. Values used by a single entity are avoided by using
    at most ``n // 2`` values of a trait."""
    rng = rng_for(seed, 1)
    names = list(TRAITS)
    cols = []
    for trait in names:
        k = max(1, min(len(TRAITS[trait]), n // 2))
        col = np.resize(rng.permutation(k), n)
        rng.shuffle(col)
        cols.append(col)
    grid = np.stack(cols, axis=1)

    def violations(g: np.ndarray) -> int:
        dist = (g[:, None, :] != g[None, :, :]).sum(-1)
        return int(((dist < min_distance).sum() - n) // 2)

    bad = violations(grid)
    for _ in range(max_steps):
        if bad == 0:
            break
        dist = (grid[:, None, :] != grid[None, :, :]).sum(-1) + np.eye(n, dtype=int) * 99
        i = int(rng.choice(np.flatnonzero((dist < min_distance).any(1))))
        j, t = int(rng.integers(n)), int(rng.integers(len(names)))
        trial = grid.copy()
        trial[i, t], trial[j, t] = grid[j, t], grid[i, t]
        score = violations(trial)
        if score <= bad:
            grid, bad = trial, score
    if bad:
        raise BenchmarkError(
            f"cannot give {n} entities visual identities {min_distance} traits apart; "
            "use fewer entities or a lower min_trait_distance"
        )
    return [dict(zip(names, map(int, row))) for row in grid]


def _person_layer(identity: dict[str, int], size: int) -> Image.Image:
    """The entity drawn upright and centred on a transparent canvas of ``size`` pixels."""
    t = {k: TRAITS[k][v] for k, v in identity.items()}
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    s = size / 100.0
    hair, skin, shirt = t["hair_color"], t["skin"], t["shirt_color"]

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    if t["hair_style"] == "long":
        d.rounded_rectangle(box(27, 18, 73, 72), radius=18 * s, fill=hair)
    d.rounded_rectangle(box(18, 70, 82, 112), radius=16 * s, fill=shirt)
    dark = tuple(int(c * 0.45) for c in shirt)
    if t["pattern"] == "stripes":
        for y in range(74, 100, 8):
            d.rectangle(box(18, y, 82, y + 3.5), fill=dark)
    elif t["pattern"] == "dots":
        for y in range(76, 100, 9):
            for x in range(24, 80, 10):
                d.ellipse(box(x, y, x + 4.5, y + 4.5), fill=dark)
    d.rectangle(box(44, 58, 56, 74), fill=skin)
    head = {"round": (31, 22, 69, 60), "oval": (34, 18, 66, 62), "square": (31, 22, 69, 60)}[t["face"]]
    if t["face"] == "square":
        d.rounded_rectangle(box(*head), radius=5 * s, fill=skin)
    else:
        d.ellipse(box(*head), fill=skin)
    if t["hair_style"] in ("short", "long", "bun"):
        d.chord(box(head[0] - 2, head[1] - 4, head[2] + 2, head[1] + 24), 180, 360, fill=hair)
    if t["hair_style"] == "bun":
        d.ellipse(box(42, 6, 58, 22), fill=hair)
    if t["hair_style"] == "spiky":
        pts = []
        for i in range(7):
            x = head[0] + i * (head[2] - head[0]) / 6
            pts += [(x * s, (head[1] + 8) * s), ((x + 3) * s, (head[1] - 8) * s)]
        d.polygon(pts + [(head[2] * s, (head[1] + 10) * s), (head[0] * s, (head[1] + 10) * s)], fill=hair)
    for x in (42, 54):
        d.ellipse(box(x, 37, x + 5, 42), fill=(20, 20, 30))
    d.arc(box(43, 45, 57, 53), 20, 160, fill=(120, 40, 40), width=max(1, int(1.5 * s)))
    acc = t["accessory"]
    if acc == "glasses":
        for x in (39, 52):
            d.ellipse(box(x, 34, x + 10, 45), outline=(10, 10, 10), width=max(1, int(2 * s)))
        d.line(box(49, 39, 52, 39), fill=(10, 10, 10), width=max(1, int(2 * s)))
    elif acc == "hat":
        d.rectangle(box(33, 6, 67, 24), fill=(45, 45, 50))
        d.rectangle(box(24, 22, 76, 27), fill=(45, 45, 50))
    elif acc == "earrings":
        for x in (head[0] - 3, head[2] - 3):
            d.ellipse(box(x, 45, x + 6, 51), fill=(250, 205, 40))
    return layer


def render(identity: dict[str, int], rng: np.random.Generator, size: int, scale: int = 3,
           var: Variation = Variation()) -> Image.Image:
    """One portrait: random background and clutter, the person posed, lit and noised."""
    big = size * scale
    c0 = rng.integers(40, 216, size=3)
    c1 = np.clip(c0 + rng.integers(-60, 61, size=3), 0, 255)
    ramp = np.linspace(0, 1, big)[:, None, None]
    bg = (c0 * (1 - ramp) + c1 * ramp).astype(np.uint8).repeat(big, axis=1)
    canvas = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, var.clutter + 1))):
        x0, y0 = rng.integers(0, big, size=2)
        w, h = rng.integers(big // 10, big // 3, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=colour)
    person = _person_layer(identity, big)
    k = float(rng.uniform(*var.scale))
    person = person.resize((max(1, int(big * k)), max(1, int(big * k))), Image.BICUBIC)
    person = person.rotate(float(rng.uniform(-var.max_rotation, var.max_rotation)), Image.BICUBIC, expand=False)
    dx, dy = (rng.uniform(-var.max_shift, var.max_shift, size=2) * big).astype(int)
    off = ((big - person.width) // 2 + int(dx), (big - person.height) // 2 + int(dy) + int(big * (1 - k) * 0.4))
    canvas.paste(person, off, person)
    canvas = ImageEnhance.Brightness(canvas).enhance(float(rng.uniform(*var.brightness)))
    canvas = ImageEnhance.Contrast(canvas).enhance(float(rng.uniform(*var.contrast)))
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2)) * scale))
    img = np.asarray(canvas.resize((size, size), Image.LANCZOS), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    light = 1 + 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = img * light[..., None] * (1 + rng.uniform(-var.tint, var.tint, size=3))
    img = img + rng.normal(0, rng.uniform(*var.noise_sigma), size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
