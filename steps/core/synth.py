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


# Relations of the synthetic world: (subject kind, object kind, the fact, the decomposition
# question, the noun phrase that refers to the object in a composed question).
_RELATIONS = {
    "spouse": ("person", "person", "{a} is married to {b} .", "who is the spouse of {a} ?", "the spouse of {a}"),
    "mentor": ("person", "person", "{a} is mentored by {b} .", "who mentors {a} ?", "the mentor of {a}"),
    "born": ("person", "city", "{a} was born in {b} .", "where was {a} born ?", None),
    "works": ("person", "city", "{a} works in {b} .", "where does {a} work ?", None),
    "country": ("city", "country", "{a} is a city in {b} .", "which country is {a} in ?", None),
}
# Chains by hop count, read left to right from the question's person (MuSiQue's 2-, 3- and
# 4-hop shapes, plus 1-hop questions that one document answers: they need no reasoning chain).
CHAINS = {
    1: (("born",), ("works",), ("spouse",), ("mentor",)),
    2: (("born", "country"), ("works", "country"), ("spouse", "born"), ("mentor", "works")),
    3: (("spouse", "born", "country"), ("mentor", "works", "country"), ("spouse", "mentor", "born"),
        ("mentor", "spouse", "works")),
    4: (("spouse", "mentor", "born", "country"), ("mentor", "spouse", "works", "country")),
}
# MuSiQue's id prefixes (the official ids carry the hop count: 2hop__, 3hop1__, 4hop3__, ...).
_ID_PREFIX = {1: "1hop", 2: "2hop", 3: "3hop1", 4: "4hop1"}


def _question(chain: tuple[str, ...], p: str) -> str:
    """The composed question: nested noun phrases for the person hops, then the last relation."""
    phrase = p
    persons = [r for r in chain if _RELATIONS[r][1] == "person"]
    for r in persons:
        phrase = _RELATIONS[r][4].format(a=phrase)
    rest = chain[len(persons):]
    if not rest:  # 1-hop about a person, e.g. "who is the spouse of kalo ?"
        return _RELATIONS[chain[0]][3].format(a=p)
    verb = "was {x} born" if rest[0] == "born" else "does {x} work"
    where = "country" if rest[-1] == "country" else "city"
    return f"in which {where} {verb.format(x=phrase)} ?"


def _musique_row(world: World, rng: random.Random, i: int, hops: int) -> dict[str, Any]:
    chain = rng.choice(CHAINS[hops])
    people = rng.sample(world.people, 6)
    entities, supports, lures = [people[0]], [], []
    spare_people = people[3:]
    for r in chain:
        kind_a, kind_b, fact, _, _ = _RELATIONS[r]
        a = entities[-1]
        if kind_b == "person":
            b = next(x for x in people[1:3] + spare_people if x not in entities)
        elif kind_b == "city":
            b = rng.choice(world.cities)
        else:
            b = world.country_of[a]
        entities.append(b)
        supports.append(fact.format(a=a, b=b))
        # Lures: the same subject under a sibling relation, or the same relation about someone else.
        if kind_a == "person":
            sibling = {"spouse": "mentor", "mentor": "spouse", "born": "works", "works": "born"}[r]
            if sibling == "spouse" and "spouse" in chain:  # marriage is symmetric: keep the world consistent
                sibling = "born" if kind_b == "city" else "mentor"
                if sibling == r:
                    sibling = "works"
            other = (rng.choice([x for x in world.cities if x != b]) if kind_b == "city"
                     else rng.choice([x for x in spare_people if x not in entities] or spare_people))
            lures.append(_RELATIONS[sibling][2].format(a=a, b=other))
            # Never about a chain entity: "x is married to <chain person>" would make the
            # symmetric spouse relation ambiguous.
            strangers = [x for x in world.people if x not in entities and x != other]
            stranger, obj = rng.sample(strangers, 2)
            lures.append(fact.format(a=stranger, b=rng.choice(world.cities) if kind_b == "city" else obj))
        else:
            c2 = rng.choice([x for x in world.cities if world.country_of[x] != b])
            lures.append(_RELATIONS["country"][2].format(a=c2, b=world.country_of[c2]))
    n_lures = min(len(lures), rng.randint(1, 2))
    texts = [(t, True) for t in supports] + [(t, False) for t in rng.sample(lures, n_lures)]
    rng.shuffle(texts)
    paragraphs = [{"idx": j, "title": t.split()[0], "paragraph_text": t, "is_supporting": s}
                  for j, (t, s) in enumerate(texts)]
    idx_of = {t: j for j, (t, _) in enumerate(texts)}
    decomposition = [{"id": 1000 * i + h, "question": _RELATIONS[r][3].format(a=entities[h] if h == 0 else f"#{h}"),
                      "answer": entities[h + 1], "paragraph_support_idx": idx_of[supports[h]]}
                     for h, r in enumerate(chain)]
    return {"id": f"{_ID_PREFIX[hops]}__synth{i:06d}", "paragraphs": paragraphs, "question": _question(chain, people[0]),
            "question_decomposition": decomposition, "answer": entities[-1],
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


def musique_rows(n: int, seed: int, hop_mix: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """`n` examples; `hop_mix` maps a hop count (1-4) to its share (default: 2-hop only)."""
    world = World(seed)
    rng = random.Random(f"musique-{seed}")
    mix = hop_mix or {2: 1.0}
    if not mix or any(h not in CHAINS for h in mix) or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"hop_mix must map hop counts in {sorted(CHAINS)} to non-negative shares, got {mix}")
    hops, weights = zip(*sorted(mix.items()))
    return [_musique_row(world, rng, i, rng.choices(hops, weights)[0]) for i in range(n)]


def ecommerce_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"ecommerce-{seed}")
    return [_ecommerce_row(rng, i) for i in range(n)]
