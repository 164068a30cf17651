"""The embedded default's data: a synthetic multi-hop QA set in the official MuSiQue JSONL
format and an e-commerce product QA set in the ePQA shape, so that they flow through exactly
the loaders that real files use.

The world is small on purpose (a word-level vocabulary of a few hundred words) so that models
trained from scratch on two CPU cores learn it in minutes. City -> country is fixed
"geography"; every person fact is drawn per example, so a model must read the documents
rather than memorise them. Each example carries lures (facts about the wrong relation or the
wrong product) so that careless reasoning gives a wrong but plausible answer.
"""
from __future__ import annotations

import random
from typing import Any

_SYLLABLES = "ka lo mi ra te su no vi da pe zo lu fa ri be go".split()
COUNTRIES = ("norland", "estavia", "marovia", "kestria", "delmark", "ostara",
             "veluna", "tarsis", "bramia", "lorvania", "quenta", "sarnia")
COLORS = ("red", "blue", "green", "black", "white", "grey", "yellow", "pink")
MATERIALS = ("steel", "plastic", "wood", "glass", "cotton", "leather", "bamboo", "ceramic")
SIZES = ("small", "medium", "large")
WARRANTIES = ("one", "two", "three", "five")
PRODUCT_TYPES = ("kettle", "mug", "lamp", "chair", "backpack", "speaker", "blender", "jacket",
                 "bottle", "desk", "pillow", "clock")
BRANDS = ("acme", "orbix", "nuvo", "kelda", "zentra", "marlo", "pexa", "vimbo", "tolka", "sorin")


def _names(n: int, rng: random.Random, syllables: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(syllables)))
    return sorted(out)


class World:
    """Entities and fixed geography, derived from a seed."""

    def __init__(self, seed: int, n_people: int = 100, n_cities: int = 40):
        rng = random.Random(f"world-{seed}")
        self.people = _names(n_people, rng, 2)
        self.cities = [c for c in _names(n_cities + n_people, rng, 3) if c not in self.people][:n_cities]
        self.country_of = {c: rng.choice(COUNTRIES) for c in self.cities}


def _musique_row(world: World, rng: random.Random, i: int) -> dict[str, Any]:
    p, q, lure_p = rng.sample(world.people, 3)
    c, c2, c3 = rng.sample(world.cities, 3)
    while world.country_of[c2] == world.country_of[c]:
        c2 = rng.choice(world.cities)
    kind = rng.choice(("born", "works", "spouse"))
    if kind == "born":
        question = f"in which country was {p} born ?"
        hops = [(f"where was {p} born ?", c, f"{p} was born in {c} ."),
                (f"which country is #1 in ?", world.country_of[c], f"{c} is a city in {world.country_of[c]} .")]
        lures = [f"{p} works in {c2} .", f"{c2} is a city in {world.country_of[c2]} .",
                 f"{lure_p} was born in {c3} ."]
    elif kind == "works":
        question = f"in which country does {p} work ?"
        hops = [(f"where does {p} work ?", c, f"{p} works in {c} ."),
                (f"which country is #1 in ?", world.country_of[c], f"{c} is a city in {world.country_of[c]} .")]
        lures = [f"{p} was born in {c2} .", f"{c2} is a city in {world.country_of[c2]} .",
                 f"{lure_p} works in {c3} ."]
    else:
        question = f"in which city was the spouse of {p} born ?"
        hops = [(f"who is the spouse of {p} ?", q, f"{p} is married to {q} ."),
                (f"where was #1 born ?", c, f"{q} was born in {c} .")]
        lures = [f"{q} works in {c2} .", f"{p} was born in {c3} .", f"{lure_p} was born in {c2} ."]
    n_lures = rng.randint(1, 2)
    texts = [(h[2], True) for h in hops] + [(t, False) for t in rng.sample(lures, n_lures)]
    rng.shuffle(texts)
    paragraphs = [{"idx": j, "title": t.split()[0], "paragraph_text": t, "is_supporting": s}
                  for j, (t, s) in enumerate(texts)]
    idx_of = {t: j for j, (t, _) in enumerate(texts)}
    decomposition = [{"id": 1000 * i + h, "question": hq, "answer": ha, "paragraph_support_idx": idx_of[ht]}
                     for h, (hq, ha, ht) in enumerate(hops)]
    return {"id": f"2hop__synth{i:06d}", "paragraphs": paragraphs, "question": question,
            "question_decomposition": decomposition, "answer": hops[-1][1],
            "answer_aliases": [], "answerable": True}


_ATTR_QUESTIONS = {
    "color": ("what color is it ?", "the {p} is {v} ."),
    "material": ("what is it made of ?", "the {p} is made of {v} ."),
    "size": ("what size is it ?", "the {p} comes in {v} size ."),
    "warranty": ("how long is the warranty ?", "the {p} has a {v} year warranty ."),
    "origin": ("where is it made ?", "the {p} is made in {v} ."),
}
# What a helpful assistant adds after the answer: the attribute a buyer asks about next.
RELATED = {"color": "material", "material": "warranty", "size": "color",
           "warranty": "origin", "origin": "material"}


def _values(rng: random.Random) -> dict[str, str]:
    return {"color": rng.choice(COLORS), "material": rng.choice(MATERIALS), "size": rng.choice(SIZES),
            "warranty": rng.choice(WARRANTIES), "origin": rng.choice(COUNTRIES)}


def _ecommerce_row(rng: random.Random, i: int) -> dict[str, Any]:
    ptype = rng.choice(PRODUCT_TYPES)
    brand, sibling_brand = rng.sample(BRANDS, 2)
    product, sibling = f"{brand} {ptype}", f"{sibling_brand} {ptype}"
    vals, sib_vals = _values(rng), _values(rng)
    attr = rng.choice(list(_ATTR_QUESTIONS))
    related = RELATED[attr]
    while sib_vals[attr] == vals[attr]:
        sib_vals = _values(rng)
    question, template = _ATTR_QUESTIONS[attr]
    docs = [(template.format(p=product, v=vals[attr]), 2),
            (_ATTR_QUESTIONS[related][1].format(p=product, v=vals[related]), 1)]
    others = [a for a in _ATTR_QUESTIONS if a not in (attr, related)]
    for a in rng.sample(others, rng.randint(0, 1)):
        docs.append((_ATTR_QUESTIONS[a][1].format(p=product, v=vals[a]), 0))
    # Lures: the sibling product's value for the very attribute asked about.
    docs.append((template.format(p=sibling, v=sib_vals[attr]), 0))
    if rng.random() < 0.5:
        docs.append((_ATTR_QUESTIONS[related][1].format(p=sibling, v=sib_vals[related]), 0))
    rng.shuffle(docs)
    history = [{"role": "user", "content": f"i like the {product} ."},
               {"role": "assistant", "content": "sure ."}]
    return {"qid": f"synth{i:06d}", "question": question, "dialogue_history": history,
            "documents": [{"qa_pair_id": str(j), "source": "attribute", "text": t, "label": lab}
                          for j, (t, lab) in enumerate(docs)],
            "reference_answers": [template.format(p=product, v=vals[attr])],
            "partial_answers": []}


def musique_rows(n: int, seed: int) -> list[dict[str, Any]]:
    world = World(seed)
    rng = random.Random(f"musique-{seed}")
    return [_musique_row(world, rng, i) for i in range(n)]


def ecommerce_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"ecommerce-{seed}")
    return [_ecommerce_row(rng, i) for i in range(n)]
