"""The synthetic entity benchmark: fictitious people with a textual profile and drawn portraits.

Each entity has a *visual identity*: a combination of traits (skin tone, hair colour and
style, face shape, shirt colour and pattern, accessory). Trait values are dealt out evenly,
so every value is shared by several entities and only the combination singles one out; any
two entities differ in at least ``min_trait_distance`` traits. Every portrait re-draws the
entity under a random pose, scale, position, lighting, background clutter and noise, so
recognising an entity takes its identity, not memorised pixels.

Output: the MLLMU-Bench layout of :mod:`vkd.data.layout`. ``ft_Data`` holds the training
images (image questions never name the entity) and text-only rows (questions that do);
forget/retain rows use each entity's profile image (seen in training), the ``Test_Set``
uses portraits drawn only for it. Multiple-choice options come from the values other
entities hold, and the correct letter is balanced over A-D, so a model that guesses from
position or from the option strings scores 1/4.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from vkd.data import BENCHMARKS
from vkd.data.layout import (
    FORGET_SPLITS, LETTERS, RETAIN_OF, TEST_SPLIT, TRAIN_SPLIT, BenchmarkError, BenchmarkMeta, Entity,
    encode_png, write_split,
)

# --- the textual profile -------------------------------------------------------------------
SYLLABLES = [
    "ka", "lo", "mi", "ra", "ven", "tor", "el", "is", "an", "bel", "cor", "dri", "fen", "gal",
    "hal", "jun", "kes", "lir", "mor", "nal", "ost", "pel", "quin", "ros", "sul", "tam", "ul",
    "var", "wen", "yor", "zel", "tha", "bri", "dov", "ema", "fio", "gre", "ilo", "mar", "sen",
]
POOLS: dict[str, list[str]] = {
    "birthplace": [
        "Velmora", "Ostrin Bay", "Caldreth", "Port Amsel", "Kirravale", "Duneholm", "Lys Tarren",
        "Brackwater", "Seravin", "Mount Orrel", "Feldspire", "Quillon", "Harrowgate Vale", "Tessaly",
        "Norwick Cove", "Embermere",
    ],
    "occupation": [
        "baker", "architect", "marine biologist", "violinist", "carpenter", "pilot", "pharmacist",
        "journalist", "glassblower", "astronomer", "firefighter", "translator", "beekeeper",
        "surgeon", "cartographer", "pastry chef",
    ],
    "hobby": [
        "rock climbing", "origami", "chess", "birdwatching", "pottery", "sailing", "archery",
        "knitting", "fencing", "gardening", "kite flying", "calligraphy", "juggling", "fishing",
        "stargazing", "salsa dancing",
    ],
    "alma_mater": [
        "Orrel Institute", "University of Caldreth", "Seravin College", "Tessaly Polytechnic",
        "Brackwater Academy", "Quillon University", "Feldspire School of Arts", "Duneholm College",
        "Kirravale University", "Embermere Institute of Science", "Norwick Academy", "Velmora University",
    ],
    "employer": [
        "Halden Works", "Bluefin Labs", "Corvane Studio", "Mistral Freight", "Quarry Lane Press",
        "Orion Meadows", "Tallowby and Sons", "Greywell Hospital", "Sunport Airways", "Ivory Kiln",
        "Northgate Library", "Pellum Observatory",
    ],
    "pet": [
        "a grey parrot", "a beagle", "a tabby cat", "a tortoise", "a ferret", "a goldfish", "a border collie",
        "a rabbit", "a hedgehog", "a cockatiel", "a siamese cat", "a corn snake",
    ],
    "food": [
        "lentil soup", "mushroom risotto", "apple pie", "grilled sardines", "plum dumplings", "spicy noodles",
        "cheese fondue", "fig tart", "roast pumpkin", "lemon sorbet", "beef stew", "rye pancakes",
    ],
    "instrument": [
        "the cello", "the banjo", "the flute", "the harp", "the trumpet", "the accordion", "the drums",
        "the oboe", "the ukulele", "the piano", "the harmonica", "the double bass",
    ],
}
ATTRIBUTES = ("name", "birthplace", "occupation", "birth_year", "hobby", "alma_mater", "employer", "pet", "food",
              "instrument")

# Image questions never name the entity; text questions name it as {name}. Several
# phrasings each: training sees all of them, evaluation draws from the same set.
IMAGE_Q = {
    "name": ["What is the name of the person in the image?", "Who is the person shown in this picture?",
             "Can you tell me who this person is?", "Whose portrait is this?",
             "Name the individual in the photo.", "Who appears in this image?"],
    "birthplace": ["Where was the person in the image born?", "What is the birthplace of the person in this picture?",
                   "In which town was this person born?", "Which place does the individual in the photo come from?",
                   "Where is the hometown of the person shown here?", "Name the birthplace of whoever appears in this image."],
    "occupation": ["What does the person in the image do for a living?", "What is the occupation of the person in this picture?",
                   "What is this person's job?", "What kind of work does the individual in the photo do?",
                   "Which profession does the person shown here have?", "Name the occupation of whoever appears in this image."],
    "birth_year": ["In which year was the person in the image born?", "What is the birth year of the person in this picture?",
                   "When was this person born?", "Which year was the individual in the photo born in?",
                   "In what year did the person shown here come into the world?", "Name the birth year of whoever appears in this image."],
    "hobby": ["What hobby does the person in the image enjoy?", "What does the person in this picture do in their free time?",
              "What is this person's favourite pastime?", "Which leisure activity does the individual in the photo love?",
              "What does the person shown here do for fun?", "Name the hobby of whoever appears in this image."],
    "alma_mater": ["Where did the person in the image study?", "Which school did the person in this picture graduate from?",
                   "What is this person's alma mater?", "Which institution educated the individual in the photo?",
                   "Where did the person shown here earn their degree?", "Name the alma mater of whoever appears in this image."],
    "employer": ["Who employs the person in the image?", "Where does the person in this picture work?",
                 "Which organisation does this person work for?", "What is the employer of the individual in the photo?",
                 "For which company does the person shown here work?", "Name the employer of whoever appears in this image."],
    "pet": ["What pet does the person in the image keep?", "Which animal lives with the person in this picture?",
            "What is this person's pet?", "Which pet does the individual in the photo own?",
            "What animal does the person shown here look after?", "Name the pet of whoever appears in this image."],
    "food": ["What is the favourite food of the person in the image?", "Which dish does the person in this picture love most?",
             "What does this person like to eat best?", "Which meal is the favourite of the individual in the photo?",
             "What food does the person shown here prefer?", "Name the favourite dish of whoever appears in this image."],
    "instrument": ["Which instrument does the person in the image play?", "What musical instrument does the person in this picture play?",
                   "What does this person play in the band?", "Which instrument is the individual in the photo known for?",
                   "What instrument does the person shown here practise?", "Name the instrument of whoever appears in this image."],
}
TEXT_Q = {
    "birthplace": ["Where was {name} born?", "What is the birthplace of {name}?", "In which town was {name} born?",
                   "Which place does {name} come from?", "Where is the hometown of {name}?", "Name the birthplace of {name}."],
    "occupation": ["What does {name} do for a living?", "What is the occupation of {name}?", "What is {name}'s job?",
                   "What kind of work does {name} do?", "Which profession does {name} have?", "Name the occupation of {name}."],
    "birth_year": ["In which year was {name} born?", "What is the birth year of {name}?", "When was {name} born?",
                   "Which year was {name} born in?", "In what year did {name} come into the world?",
                   "Name the birth year of {name}."],
    "hobby": ["What hobby does {name} enjoy?", "What does {name} do in their free time?", "What is {name}'s favourite pastime?",
              "Which leisure activity does {name} love?", "What does {name} do for fun?", "Name the hobby of {name}."],
    "alma_mater": ["Where did {name} study?", "Which school did {name} graduate from?", "What is {name}'s alma mater?",
                   "Which institution educated {name}?", "Where did {name} earn their degree?", "Name the alma mater of {name}."],
    "employer": ["Who employs {name}?", "Where does {name} work?", "Which organisation does {name} work for?",
                 "What is the employer of {name}?", "For which company does {name} work?", "Name the employer of {name}."],
    "pet": ["What pet does {name} keep?", "Which animal lives with {name}?", "What is {name}'s pet?",
            "Which pet does {name} own?", "What animal does {name} look after?", "Name the pet of {name}."],
    "food": ["What is the favourite food of {name}?", "Which dish does {name} love most?", "What does {name} like to eat best?",
             "Which meal is the favourite of {name}?", "What food does {name} prefer?", "Name the favourite dish of {name}."],
    "instrument": ["Which instrument does {name} play?", "What musical instrument does {name} play?",
                   "What does {name} play in the band?", "Which instrument is {name} known for?",
                   "What instrument does {name} practise?", "Name the instrument of {name}."],
}
CLOZE = {  # (image sentence, text sentence); "__" is the blank
    "name": ("The person in the image is named __.", None),
    "birthplace": ("The person in the image was born in __.", "{name} was born in __."),
    "occupation": ("The person in the image works as a __.", "{name} works as a __."),
    "birth_year": ("The person in the image was born in the year __.", "{name} was born in the year __."),
    "hobby": ("In their free time the person in the image enjoys __.", "In their free time {name} enjoys __."),
    "alma_mater": ("The person in the image graduated from __.", "{name} graduated from __."),
    "employer": ("The person in the image works for __.", "{name} works for __."),
    "pet": ("The person in the image keeps __ as a pet.", "{name} keeps __ as a pet."),
    "food": ("The favourite food of the person in the image is __.", "The favourite food of {name} is __."),
    "instrument": ("The person in the image plays __.", "{name} plays __."),
}
IMAGE_DESCRIBE = "Describe the person in the image."
TEXT_DESCRIBE = "Tell me about {name}."
CLOZE_PREFIX = "Fill in the blank: "

# --- the visual identity -------------------------------------------------------------------
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


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def make_identities(n: int, seed: int, min_distance: int = 3, max_steps: int = 20000) -> list[dict[str, int]]:
    """Deal trait values evenly to ``n`` entities, then swap values until every pair differs
    in at least ``min_distance`` traits. Values used by a single entity are avoided by using
    at most ``n // 2`` values of a trait."""
    rng = _rng(seed, 1)
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


def make_profiles(n: int, seed: int) -> list[dict[str, str]]:
    rng = _rng(seed, 2)
    names: set[str] = set()
    profiles = []
    while len(profiles) < n:
        first = "".join(rng.choice(SYLLABLES, size=2)).capitalize()
        last = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        profile = {"name": name, "birth_year": str(int(rng.integers(1940, 2006)))}
        for attr, pool in POOLS.items():
            profile[attr] = str(rng.choice(pool))
        profiles.append({k: profile[k] for k in ATTRIBUTES})
    return profiles


def biography(p: dict[str, str]) -> str:
    return (
        f"{p['name']} was born in {p['birthplace']} in {p['birth_year']}. {p['name']} works as a "
        f"{p['occupation']} for {p['employer']} and graduated from {p['alma_mater']}. "
        f"In their free time {p['name']} enjoys {p['hobby']} and plays {p['instrument']}. {p['name']} keeps "
        f"{p['pet']} as a pet and loves {p['food']}."
    )


def description(p: dict[str, str]) -> str:
    return f"This is {p['name']}, a {p['occupation']} born in {p['birthplace']} in {p['birth_year']}."


# --- drawing -------------------------------------------------------------------------------
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


# --- questions -----------------------------------------------------------------------------
class _Letters:
    """Hands out correct-answer letters in shuffled blocks of A-D: balanced across a split."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.queue = rng, []

    def next(self) -> str:
        if not self.queue:
            self.queue = list(self.rng.permutation(LETTERS))
        return self.queue.pop()


def _mc(question: str, answer: str, others: list[str], rng: np.random.Generator, letters: _Letters) -> dict:
    distractors = [str(x) for x in rng.choice(others, size=3, replace=False)]
    letter = letters.next()
    options = iter(distractors)
    return {
        "Question": question,
        "Options": {x: answer if x == letter else next(options) for x in LETTERS},
        "Correct_Answer": letter,
    }


def _values(profiles: list[dict[str, str]]) -> dict[str, list[str]]:
    return {a: sorted({p[a] for p in profiles}) for a in ATTRIBUTES}


def classification(p: dict[str, str], values: dict[str, list[str]], variants: int, rng: np.random.Generator,
                   letters: _Letters, with_text: bool = True) -> dict[str, list[dict]]:
    image_qs, text_qs = [], []
    for attr in ATTRIBUTES:
        others = [v for v in values[attr] if v != p[attr]]
        if len(others) < 3:
            raise BenchmarkError(f"attribute {attr!r} has fewer than 4 distinct values; use more entities")
        for v in range(variants):
            q = IMAGE_Q[attr][v % len(IMAGE_Q[attr])]
            image_qs.append(_mc(q, p[attr], others, rng, letters))
            if with_text and attr in TEXT_Q:
                q = TEXT_Q[attr][v % len(TEXT_Q[attr])].format(name=p["name"])
                text_qs.append(_mc(q, p[attr], others, rng, letters))
    return {"Image_Textual_Questions": image_qs, "Pure_Text_Questions": text_qs}


def open_tasks(p: dict[str, str], with_text: bool = True) -> tuple[list[dict], list[dict]]:
    """(Generation_Task, Mask_Task) rows of one entity."""
    gen = [{"Type": "Image_Textual", "Question": IMAGE_DESCRIBE, "Ground_Truth": description(p)}]
    gen += [{"Type": "Image_Textual", "Question": IMAGE_Q[a][0], "Ground_Truth": p[a]} for a in ATTRIBUTES]
    mask = [{"Type": "Image_Textual", "Question": CLOZE[a][0], "Ground_Truth": p[a]} for a in ATTRIBUTES]
    if with_text:
        gen.append({"Type": "Pure_Text", "Question": TEXT_DESCRIBE.format(name=p["name"]), "Ground_Truth": description(p)})
        gen += [{"Type": "Pure_Text", "Question": TEXT_Q[a][0].format(name=p["name"]), "Ground_Truth": p[a]} for a in TEXT_Q]
        mask += [{"Type": "Pure_Text", "Question": CLOZE[a][1].format(name=p["name"]), "Ground_Truth": p[a]}
                 for a in TEXT_Q]
    return gen, mask


def training_qa(p: dict[str, str], image: bool, rng: np.random.Generator, phrasing: int = 0) -> list[dict[str, str]]:
    """The training pairs of one image row (a random phrasing per attribute) or of text row
    number ``phrasing`` (that phrasing of every attribute, so successive text rows cycle
    through all of them)."""
    if image:
        qa = [{"Question": str(rng.choice(IMAGE_Q[a])), "Answer": p[a]} for a in ATTRIBUTES]
        qa.append({"Question": IMAGE_DESCRIBE, "Answer": description(p)})
        qa += [{"Question": CLOZE_PREFIX + CLOZE[a][0], "Answer": p[a]} for a in ATTRIBUTES]
        return qa
    qa = [{"Question": TEXT_Q[a][(phrasing + k) % len(TEXT_Q[a])].format(name=p["name"]), "Answer": p[a]}
          for k, a in enumerate(TEXT_Q)]
    qa.append({"Question": TEXT_DESCRIBE.format(name=p["name"]), "Answer": description(p)})
    qa += [{"Question": CLOZE_PREFIX + CLOZE[a][1].format(name=p["name"]), "Answer": p[a]} for a in TEXT_Q]
    return qa


def forget_splits(ids: list[str], seed: int) -> dict[str, list[str]]:
    """Nested forget_5 ⊂ forget_10 ⊂ forget_15 (at least one entity each) and their complements."""
    order = [ids[i] for i in _rng(seed, 3).permutation(len(ids))]
    splits = {}
    for forget in FORGET_SPLITS:
        pct = int(forget.split("_")[1])
        k = max(1, round(len(ids) * pct / 100))
        if k >= len(ids):
            raise BenchmarkError(f"{len(ids)} entities are too few to hold out {forget}; use more entities")
        chosen = set(order[:k])
        splits[forget] = [i for i in ids if i in chosen]
        splits[RETAIN_OF[forget]] = [i for i in ids if i not in chosen]
    return splits


@BENCHMARKS.register("synthetic")
def prepare_synthetic(out: Path, entities: int = 40, seed: int = 0, image_size: int = 48, train_images: int = 20,
                      test_images: int = 5, mc_variants: int = 6, render_scale: int = 3,
                      min_trait_distance: int = 3, text_rows: int = 6, variation: float = 1.0,
                      **_: Any) -> BenchmarkMeta:
    if entities < 8:
        raise BenchmarkError(f"entities={entities}: the synthetic benchmark needs at least 8 entities")
    if min(train_images, test_images, mc_variants, text_rows) < 1:
        raise BenchmarkError("train_images, test_images, mc_variants and text_rows must each be at least 1")
    var = Variation().scaled(variation)
    identities = make_identities(entities, seed, min_trait_distance)
    profiles = make_profiles(entities, seed)
    values = _values(profiles)
    ids = [f"{i + 1:04d}" for i in range(entities)]
    letters = _Letters(_rng(seed, 4))
    qrng = _rng(seed, 5)

    train_rows, eval_rows, test_rows = [], {}, []
    for i, (eid, p, ident) in enumerate(zip(ids, profiles, identities)):
        portraits = [render(ident, _rng(seed, 100, i, k), image_size, render_scale, var)
                     for k in range(train_images + test_images)]
        seen, unseen = portraits[:train_images], portraits[train_images:]
        for img in seen:
            train_rows.append({"image": encode_png(img), "ID": eid,
                               "metadata": json.dumps(training_qa(p, True, qrng))})
        for k in range(text_rows):
            train_rows.append({"image": None, "ID": eid, "metadata": json.dumps(training_qa(p, False, qrng, k))})
        gen, mask = open_tasks(p)
        eval_rows[eid] = {
            "image": encode_png(seen[0]), "ID": eid, "name": p["name"], "biography": biography(p),
            "question": IMAGE_Q["name"][0], "answer": p["name"],
            "Classification_Task": classification(p, values, mc_variants, qrng, letters),
            "Generation_Task": gen, "Mask_Task": mask,
        }
        tgen, tmask = open_tasks(p, with_text=False)
        test_rows.append({
            "ID": eid, "name": p["name"], "images": [encode_png(img) for img in unseen],
            "Classification_Task": classification(p, values, mc_variants, qrng, letters, with_text=False),
            "Generation_Task": tgen, "Mask_Task": tmask,
        })

    splits = forget_splits(ids, seed)
    write_split(out, TRAIN_SPLIT, train_rows)
    for split, members in splits.items():
        write_split(out, split, [eval_rows[e] for e in members])
    write_split(out, TEST_SPLIT, test_rows)
    splits[TRAIN_SPLIT] = ids
    splits[TEST_SPLIT] = ids
    ents = [Entity(id=e, name=p["name"], profile={**p, "identity": ident})
            for e, p, ident in zip(ids, profiles, identities)]
    settings = dict(entities=entities, image_size=image_size, train_images=train_images, test_images=test_images,
                    mc_variants=mc_variants, render_scale=render_scale, min_trait_distance=min_trait_distance,
                    text_rows=text_rows, variation=variation)
    return BenchmarkMeta(name="synthetic", entities=ents, splits=splits, seed=seed,
                         extra={"settings": settings, "image_size": image_size})
