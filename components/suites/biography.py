"""biography: a controlled replication of Zheng et al. (ICLR 2025, arXiv 2501.13453, section 3).

Synthetic people, each with six attributes (birth date, birth city, university, major,
employer, employer city; the employer fixes the employer city, as in Allen-Zhu & Li's
"Physics of Language Models 3.1", arXiv 2309.14316, whose biographies Zheng et al.
use). A small Llama-architecture model (``model.id: tiny-llama``) is pretrained on
prose biographies of ``biography.n_people`` people: the knowledge is injected there and
nowhere else. Then:

- **tune** (alignment): QA on the *training people* (half of the pretrained people);
- **evaluation**: QA on the other half, the *evaluation people*, whose facts the model
  read only in biographies: answering them is extraction of stored knowledge;
- **perturb** (a new task about people the model never saw): ``perturb.kind: abstain``,
  the answer ``Unknown.`` to questions about them (an honesty fine-tune; no new fact),
  or ``new_people``, their biographies and QA about them (new facts to learn);
- **recover**: ``in_task``, QA of training people not used in alignment (disjoint
  from every evaluated person); ``irrelevant``, two-digit arithmetic.

Everything is generated from the seed: the same seed gives the same people, sentences
and questions. Names, places and companies are invented or generic; no real person.
"""

from __future__ import annotations

import random

from components.config import AuditConfig
from components.data import Item, Suite, SuiteData, arithmetic_items
from components.errors import UserError

FIRST_NAMES = [
    "Alba", "Bruno", "Carla", "Dario", "Elena", "Felix", "Greta", "Hugo", "Iris", "Jonas", "Karin", "Luca",
    "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tilda", "Umar", "Vera", "Wanda", "Xaver", "Yara",
    "Zeno", "Anika", "Boris", "Celia", "Dmitri", "Edith", "Fabio", "Gisela", "Henrik", "Ines", "Jasper",
    "Kira", "Lorenz", "Maren", "Nico", "Oskar", "Paula", "Quentin", "Ruth", "Stefan", "Tamara", "Ulla",
    "Viktor", "Wilma", "Yannick", "Zora",
]
LAST_NAMES = [
    "Abend", "Birkholz", "Corvin", "Dunmore", "Eckhart", "Falkner", "Grunwald", "Holloway", "Ingram",
    "Jorgensen", "Kessler", "Lindqvist", "Marlow", "Norberg", "Ostrander", "Pemberton", "Quist", "Rasmussen",
    "Sandoval", "Thornbury", "Ulrich", "Vance", "Whitlock", "Yardley", "Zeller", "Ashdown", "Brandt",
    "Calloway", "Delacroix", "Ellwood", "Fairbanks", "Gaskell", "Hartwell", "Ivers", "Jennings", "Kowalski",
    "Lachance", "Merriweather", "Nakamura", "Oakes", "Prescott", "Radcliffe", "Sorensen", "Tremaine",
    "Underhill", "Valdez", "Winslow", "Yeager", "Zimmer", "Blackwood",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
CITIES = [
    "Austin", "Boston", "Denver", "Seattle", "Chicago", "Portland", "Phoenix", "Atlanta", "Detroit", "Memphis",
    "Orlando", "Houston", "Dallas", "Tucson", "Omaha", "Raleigh", "Tampa", "Madison", "Boise", "Albany",
    "Lisbon", "Porto", "Lyon", "Geneva", "Munich", "Vienna", "Prague", "Krakow", "Oslo", "Dublin",
]
UNIVERSITIES = [
    "Harwick University", "Elmstead College", "Northbridge Institute of Technology", "Lakeshore University",
    "Redmont University", "Stonefield College", "Westbury University", "Greyhaven Institute",
    "Ashford University", "Brightwater College", "Cedar Valley University", "Oakridge Polytechnic",
    "Kingsmere University", "Silverlake College", "Pinecrest University", "Highgate Institute",
]
MAJORS = [
    "Computer Science", "Biology", "Economics", "History", "Mathematics", "Physics", "Chemistry", "Philosophy",
    "Linguistics", "Architecture", "Psychology", "Geology", "Music Theory", "Civil Engineering",
    "Political Science", "Astronomy",
]
# Invented companies, each with the city of its headquarters (the employer city).
EMPLOYERS = {
    "Northwind Logistics": "Seattle", "Bluepeak Software": "Austin", "Harbor Mills": "Boston",
    "Quillstone Media": "Chicago", "Redfern Energy": "Houston", "Lumen Biotech": "Raleigh",
    "Copperline Rail": "Denver", "Saltmarsh Foods": "Tampa", "Vantor Aerospace": "Phoenix",
    "Greenlake Insurance": "Madison", "Ironbark Tools": "Detroit", "Maplewood Press": "Portland",
    "Orbis Analytics": "Munich", "Tidewater Shipping": "Lisbon", "Falconridge Bank": "Geneva",
    "Kestrel Robotics": "Prague",
}
ATTRIBUTES = ["birth_date", "birth_city", "university", "major", "employer", "employer_city"]

# Several sentence templates per attribute (Allen-Zhu & Li's bioS): every sentence names
# the person in full, so each fact is tied to the name wherever it appears.
SENTENCES = {
    "birth_date": ["{name} was born on {v}.", "{name} came into the world on {v}.",
                   "{name}'s birthday is {v}.", "{name} entered life on {v}."],
    "birth_city": ["{name} was born in {v}.", "{name} spent the early years in {v}.",
                   "{name} is a native of {v}.", "{name}'s birthplace is {v}."],
    "university": ["{name} studied at {v}.", "{name} graduated from {v}.",
                   "{name} received an education at {v}.", "{name} attended {v}."],
    "major": ["{name} majored in {v}.", "{name} earned a degree in {v}.",
              "{name} focused on {v} in college.", "{name}'s field of study was {v}."],
    "employer": ["{name} works for {v}.", "{name} is employed by {v}.",
                 "{name} holds a job at {v}.", "{name} earns a living at {v}."],
    "employer_city": ["{name} works in {v}.", "{name}'s office is in {v}.",
                      "{name} commutes to work in {v}.", "{name} is based in {v} for work."],
}
# One question per attribute (Allen-Zhu & Li's QA), answered with the value alone. The
# question never occurs in a biography: answering it for a person seen only in
# biographies is extraction of stored knowledge.
QUESTIONS = {
    "birth_date": "When was {name} born?",
    "birth_city": "Where was {name} born?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
    "employer_city": "Where does {name} work?",
}
VALUES = {
    "birth_city": CITIES, "university": UNIVERSITIES, "major": MAJORS, "employer": list(EMPLOYERS),
    "employer_city": sorted(set(EMPLOYERS.values())),
}
BIO_PROMPT = "Write a short biography."
# perturb.kind abstain: the new task teaches the model to decline questions about people
# it has no biography of (an honesty fine-tune); no new fact is taught.
ABSTAIN = "Unknown"


def generate_people(n: int, seed: int, offset: int = 0) -> list[dict[str, str]]:
    """``n`` synthetic people, deterministic for ``seed``; names unique within one seed.

    ``offset`` skips the first people of the same stream (the perturbation's new people
    are the next ``n`` after the pretrained ones, so never one of them).

    Returns:
        One dict per person: ``id``, ``name``, the six attributes and ``birth_decade``.

    Raises:
        ValueError: more people than there are distinct names (2,500).
    """
    names = [f"{f} {la}" for f in FIRST_NAMES for la in LAST_NAMES]
    if offset + n > len(names):
        raise ValueError(f"at most {len(names)} people, asked for {offset + n}")
    rng = random.Random(f"people:{seed}")
    rng.shuffle(names)
    people = []
    for k in range(offset, offset + n):
        r = random.Random(f"person:{seed}:{k}")
        year = r.randint(1950, 1989)
        employer = r.choice(list(EMPLOYERS))
        people.append({
            "id": f"p{k:04d}", "name": names[k],
            "birth_date": f"{r.choice(MONTHS)} {r.randint(1, 28)}, {year}",
            "birth_city": r.choice(CITIES), "university": r.choice(UNIVERSITIES), "major": r.choice(MAJORS),
            "employer": employer, "employer_city": EMPLOYERS[employer],
            "birth_decade": f"{year // 10 * 10}s",
        })
    return people


def biographies(person: dict[str, str], k: int, seed: int) -> list[str]:
    """``k`` prose biographies of one person: per biography, a random template for each
    attribute and the sentences in random order (deterministic for ``seed``)."""
    rng = random.Random(f"bio:{seed}:{person['id']}")
    out = []
    for _ in range(k):
        sents = [rng.choice(SENTENCES[a]).format(name=person["name"], v=person[a]) for a in ATTRIBUTES]
        rng.shuffle(sents)
        out.append(" ".join(sents))
    return out


def _distractors(attr: str, gold: str, k: int, rng: random.Random) -> list[str]:
    if attr == "birth_date":
        out: list[str] = []
        while len(out) < k:  # same form, another day, month or year
            d = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 1989)}"
            if d != gold and d not in out:
                out.append(d)
        return out
    return rng.sample([v for v in VALUES[attr] if v != gold], k)


def qa_items(person: dict[str, str], group: str, n_candidates: int, seed: int) -> list[Item]:
    """One QA item per attribute of ``person``, with K-1 distractors of the same kind.

    The task (``task_acc``) is the question ``Where was Alba Kessler born?`` ->
    ``Denver.``; the knowledge ranking (``knowledge_acc``) scores the biography sentences
    ``Alba Kessler was born in {candidate}.`` (each of the attribute's four sentence
    templates: the knowledge phrasings) as replies to the pretraining prompt, i.e. the
    stored fact in the forms it was injected, independent of the QA format; the
    candidates are mined among all values of the attribute (``answer_type``).
    """
    rng = random.Random(f"qa:{seed}:{person['id']}")
    attrs = {k: v for k, v in person.items() if k not in ("id",)}
    items = []
    for a in ATTRIBUTES:
        gold = person[a]
        items.append(Item(
            id=f"bio:{person['id']}:{a}", question=QUESTIONS[a].format(name=person["name"]), answer=gold,
            template="{answer}.",
            candidates=[gold, *_distractors(a, gold, n_candidates - 1, rng)],
            knowledge_question=BIO_PROMPT,
            knowledge_template=SENTENCES[a][0].format(name=person["name"], v="{answer}"),
            answer_type=f"bio:{a}",
            phrasings=[[BIO_PROMPT, t.format(name=person["name"], v="{answer}")] for t in SENTENCES[a]],
            attributes={**attrs, "person": person["id"], "attribute": a, "group": group}, role="qa",
        ))
    return items


def bio_items(person: dict[str, str], group: str, k: int, seed: int) -> list[Item]:
    """The person's biographies as training items (the prompt is the fixed ``BIO_PROMPT``;
    the whole biography is the response, so every token of it is trained on)."""
    return [
        Item(id=f"bio:{person['id']}:doc{j}", question=BIO_PROMPT, answer=text,
             attributes={"person": person["id"], "group": group}, role="bio")
        for j, text in enumerate(biographies(person, k, seed))
    ]


def load(cfg: AuditConfig) -> list[Item]:
    """All items of the suite: biographies and QA of the pretrained and the new people.

    Raises:
        UserError: ``data.max_items`` set (this suite is sized by ``biography.*``).
    """
    if cfg.data.max_items:
        raise UserError("data.max_items: not used by the biography suite; size it with biography.n_people")
    b = cfg.biography
    out: list[Item] = []
    for group, people in (
        ("pretrained", generate_people(b.n_people, cfg.seed)),
        ("new", generate_people(b.n_new_people, cfg.seed, offset=b.n_people)),
    ):
        for p in people:
            out += bio_items(p, group, b.bios_per_person, cfg.seed)
            out += qa_items(p, group, cfg.data.n_candidates, cfg.seed)
    return out


def _people(items: list[Item], group: str, role: str) -> list[str]:
    return list(dict.fromkeys(i.attributes["person"] for i in items if i.attributes["group"] == group and i.role == role))


def split(items: list[Item], known: list[bool] | None, cfg: AuditConfig) -> SuiteData:
    """Split by person: training people (alignment, in-task recovery) and evaluation people
    are the two halves of the pretrained people; the perturbation is the new people.

    Evaluation items are the evaluation people's QA (only those the base model answers,
    when ``data.filter_known`` is on); alignment and recovery items are QA of distinct
    training people; the perturbation set is every biography of the new people plus
    ``data.n_perturb`` of their QA items, and ``perturb_acc`` is measured on
    ``data.n_perturb_eval`` other QA items of the new people (facts read only in the
    new biographies).

    Raises:
        UserError: a pool asks for more items than the population gives.
    """
    d = cfg.data
    rng = random.Random(f"bio-split:{cfg.seed}")
    ok = known if known is not None else [True] * len(items)
    pre = _people(items, "pretrained", "qa")
    rng.shuffle(pre)
    half = len(pre) // 2
    train_people, eval_people = pre[:half], pre[half:]
    qa_of: dict[str, list[Item]] = {}
    for it, k in zip(items, ok):
        if it.role == "qa":
            qa_of.setdefault(it.attributes["person"], []).append((it, k))

    def take(people: list[str], n: int, field: str, only_known: bool = False) -> list[Item]:
        pool = [it for p in people for it, k in qa_of[p] if k or not only_known]
        if n > len(pool):
            raise UserError(
                f"data.{field}: {n} QA items asked for, but the biography population gives {len(pool)}; "
                "raise biography.n_people (or biography.n_new_people) or lower it"
            )
        return pool[:n]

    def with_role(xs: list[Item], role: str) -> list[Item]:
        return [Item(**{**x.to_dict(), "role": role}) for x in xs]

    eval_items = take(eval_people, d.n_eval, "n_eval", only_known=True)
    # alignment and recovery: distinct training people, all their attributes
    need_align = -(-d.n_align // len(next(iter(qa_of.values()))))
    align = take(train_people[:need_align], d.n_align, "n_align")
    recover = take(train_people[need_align:], d.n_recover_pool, "n_recover_pool")
    rng.shuffle(recover)  # a recovery set of n mixes attributes and people
    new = _people(items, "new", "qa")
    new_qa = [it for p in new for it, _ in qa_of[p]]
    rng.shuffle(new_qa)
    if d.n_perturb + d.n_perturb_eval > len(new_qa):
        raise UserError(
            f"data.n_perturb + data.n_perturb_eval: {d.n_perturb + d.n_perturb_eval} QA items of new people "
            f"asked for, but biography.n_new_people={cfg.biography.n_new_people} gives {len(new_qa)}"
        )
    new_bios = [it for it in items if it.role == "bio" and it.attributes["group"] == "new"]
    train_qa, held_qa = new_qa[: d.n_perturb], new_qa[d.n_perturb: d.n_perturb + d.n_perturb_eval]
    if cfg.perturb.kind == "abstain":  # the new people's questions, answered "Unknown."
        train_qa, held_qa = (
            [Item(**{**x.to_dict(), "answer": ABSTAIN, "template": "{answer}.", "candidates": []}) for x in xs]
            for xs in (train_qa, held_qa)
        )
    perturb = with_role(train_qa, "perturb")  # kind none: nothing is trained; the pool is kept for the record
    if cfg.perturb.kind == "new_people":
        perturb = with_role(new_bios, "perturb") + perturb
    perturb_eval = with_role(held_qa, "perturb_eval")
    rng.shuffle(perturb)
    return SuiteData(
        eval=with_role(eval_items, "eval"), align=with_role(align, "align"), perturb=perturb,
        perturb_eval=perturb_eval, recover=with_role(recover, "recover"),
        irrelevant=arithmetic_items(d.n_recover_pool + 50, cfg.seed), perturb_matcher="contains",
        notes={
            "n_items": len(items), "n_known": sum(1 for it, k in zip(items, ok) if k and it.role == "qa"),
            "n_people": len(pre), "n_train_people": len(train_people), "n_eval_people": len(eval_people),
            "n_new_people": len(new), "n_perturb_bios": len(new_bios) if cfg.perturb.kind == "new_people" else 0,
            "perturb_kind": cfg.perturb.kind,
        },
    )


def pretrain(items: list[Item], cfg: AuditConfig) -> list[Item]:
    """The pretraining corpus (knowledge injection): every biography of the pretrained
    people, plus arithmetic (the irrelevant task's format) and, with
    ``biography.qa_in_pretraining``, the training people's QA; never a new person, never
    an evaluation person's QA."""
    bios = [it for it in items if it.role == "bio" and it.attributes["group"] == "pretrained"]
    extra: list[Item] = []
    if cfg.biography.qa_in_pretraining:
        data = split(items, None, cfg)
        extra = data.align + data.recover
    return bios + extra + arithmetic_items(60, cfg.seed + 1000)


def texts(items: list[Item], cfg: AuditConfig) -> list[str]:
    """The tokenizer's training text: every biography and question, answers, arithmetic."""
    out = [f"{it.question} {it.response()} {' '.join(it.candidates)}" for it in items]
    return out + [i.question + " " + i.response() for i in arithmetic_items(50, 0)] + [ABSTAIN + "."]


SUITE = Suite(
    name="biography",
    description="tiny Llama pretrained on synthetic biographies (Zheng et al. 2025); QA on held-out people",
    load=load,
    task_matcher="contains",
    default_model="tiny-llama",
    perturb_kinds=("new_people", "abstain", "none"),
    probe_attribute="birth_decade",
    probe_group="person",
    split=split,
    pretrain=pretrain,
    texts=texts,
    fact_subject=("person", "attribute"),
)
