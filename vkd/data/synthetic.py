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
from pathlib import Path
from typing import Any

import numpy as np

from vkd.data import BENCHMARKS
from vkd.data.layout import (
    FORGET_SPLITS, LETTERS, RETAIN_OF, TEST_SPLIT, TRAIN_SPLIT, BenchmarkError, BenchmarkMeta, Entity,
    encode_png, write_split,
)
from vkd.data.portraits import TRAITS, Variation, make_identities, render, rng_for  # noqa: F401  (re-exported)

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

def make_profiles(n: int, seed: int) -> list[dict[str, str]]:
    rng = rng_for(seed, 2)
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
    order = [ids[i] for i in rng_for(seed, 3).permutation(len(ids))]
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
    letters = _Letters(rng_for(seed, 4))
    qrng = rng_for(seed, 5)

    train_rows, eval_rows, test_rows = [], {}, []
    for i, (eid, p, ident) in enumerate(zip(ids, profiles, identities)):
        portraits = [render(ident, rng_for(seed, 100, i, k), image_size, render_scale, var)
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
