"""custom: the user's own model and data files.

``cl-audit run custom --model M --data items.jsonl [--data more.csv ...]``. The model is
any local transformers directory, GGUF file or hub id (``model.id``); the data are rows
of JSONL, CSV or Parquet files, each row one item with this schema:

====================  ========  ============================================================
field                 required  meaning
====================  ========  ============================================================
``id``                yes       unique over all files (text)
``prompt``            yes       the user turn, without chat formatting (non-empty text)
``answer``            yes       the gold answer (non-empty text): what the model is trained
                                to say for training rows, what is matched for ``eval`` rows
``role``              yes       ``align`` (tune), ``perturb``, ``recover`` (the in-task
                                recovery arm), ``eval``; optional extras: ``perturb_eval``
                                (held-out perturbation items for ``perturb_acc``) and
                                ``irrelevant`` (the irrelevant recovery arm; default:
                                built-in two-digit arithmetic)
``candidates``        no        answer options for ``knowledge_acc``, the gold answer among
                                them (a list of >= 2 distinct texts; in CSV a JSON array).
                                An ``eval`` row without them is ranked against
                                ``data.n_candidates - 1`` of the other ``eval`` rows'
                                answers and ``data.answer_pool`` (the ones the base model
                                scores highest, ``data.candidates: hard``), and its gold
                                answer's rank among all of them is ``knowledge_mrr``
``attributes``        no        an object of text values (in CSV a JSON object), kept for
                                reports and probes
``template``          no        the response with ``{answer}`` where the answer goes
                                (default ``{answer}``): the training target
``knowledge_template`` no       a sentence with ``{answer}`` that states the fact (``The
                                capital of Peru is {answer}.``): the knowledge measures
                                rank the candidates inside it, beside the base model's own
                                answer and two generic sentence forms (never inside a bare
                                answer, which a model that answers in sentences finds
                                unlikely whatever it knows)
====================  ========  ============================================================

Every file needs at least the four required fields (columns); extra fields are an
error, so a typo cannot be silently ignored. A mistake stops the audit with one line
naming the file, the line (JSONL, CSV) or row (Parquet), the field and what was
expected. The pools must not share an id, a normalised prompt or a near-duplicate
prompt (``data.leakage_similarity``) between a training role (align, perturb, recover)
and ``eval`` (:func:`components.data.check_leakage`) unless ``data.allow_leakage`` is
set. A text that spells a special token of the model's tokenizer (``<|im_end|>``) is
refused once the model is known (:func:`components.data.check_special_tokens`).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator

from components.config import AuditConfig
from components.data import Item, Suite, SuiteData, arithmetic_items, is_refusal
from components.errors import UserError

REQUIRED = ("id", "prompt", "answer", "role")
OPTIONAL = ("candidates", "attributes", "template", "knowledge_template")
ROLES = ("align", "perturb", "recover", "eval", "perturb_eval", "irrelevant")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` per row of a data file; ``where`` is ``line N`` or ``row N``.

    Raises:
        UserError: missing file, unknown extension, unreadable or malformed file.
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown data file type '{path.suffix}'; expected .jsonl, .csv or .parquet")
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
        if table.num_rows == 0:
            raise UserError(f"{path}: empty data file; expected rows with {', '.join(REQUIRED)}")
        for n, row in enumerate(table.to_pylist(), start=1):
            yield f"row {n}", row
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if fmt == "jsonl":
        if not text.strip():
            raise UserError(f"{path}: empty data file; expected one JSON object per line with {', '.join(REQUIRED)}")
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            yield f"line {n}", row
        return
    reader = csv.DictReader(text.splitlines(keepends=True))
    if reader.fieldnames is None:
        raise UserError(f"{path}: empty CSV file; expected a header line with {', '.join(REQUIRED)}")
    for row in reader:
        if None in row:
            raise UserError(f"{path}: line {reader.line_num}: more values than header columns")
        yield f"line {reader.line_num}", {k: v for k, v in row.items() if v != "" or k in REQUIRED}


def _text(value: Any, where: str, name: str, required: bool = True) -> str:
    if not isinstance(value, str) or (required and not value.strip()):
        got = "nothing" if value is None else repr(value)
        raise UserError(f"{where}: field '{name}': expected a non-empty text, got {got}")
    return value


def _maybe_json(value: Any, where: str, name: str, kind: type) -> Any:
    if isinstance(value, str) and kind is not str:  # CSV: a JSON array or object in a cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: field '{name}': expected a JSON {'array' if kind is list else 'object'}, "
                            f"got {value!r}") from None
    return value


def parse_row(row: dict, where: str) -> Item:
    """Validate one row of the schema and make it an :class:`Item`.

    Raises:
        UserError: ``{where}: field '{name}': expected ..., got ...`` for the first problem.
    """
    for k in REQUIRED:
        if k not in row or row[k] is None:
            raise UserError(f"{where}: field '{k}': missing; every row needs {', '.join(REQUIRED)}")
    extra = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if extra:
        raise UserError(f"{where}: field '{extra[0]}': unknown; expected only {', '.join(REQUIRED + OPTIONAL)}")
    rid = row["id"]
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    rid = _text(rid, where, "id")
    prompt = _text(row["prompt"], where, "prompt")
    answer = _text(row["answer"], where, "answer")
    role = row["role"]
    if role not in ROLES:
        raise UserError(f"{where}: field 'role': expected one of {', '.join(ROLES)}, got {role!r}")
    cands: list[str] = []
    if row.get("candidates") is not None:
        cands = _maybe_json(row["candidates"], where, "candidates", list)
        if not isinstance(cands, list) or not all(isinstance(c, str) and c.strip() for c in cands):
            raise UserError(f"{where}: field 'candidates': expected a list of non-empty texts, got {cands!r}")
        if len(cands) < 2 or len(set(cands)) != len(cands):
            raise UserError(f"{where}: field 'candidates': expected at least 2 distinct texts, got {cands!r}")
        if answer not in cands:
            raise UserError(f"{where}: field 'candidates': the answer {answer!r} is not among them")
        cands = [answer, *[c for c in cands if c != answer]]
    attrs: dict[str, str] = {}
    if row.get("attributes") is not None:
        attrs = _maybe_json(row["attributes"], where, "attributes", dict)
        if not isinstance(attrs, dict) or not all(isinstance(v, (str, int, float)) for v in attrs.values()):
            raise UserError(f"{where}: field 'attributes': expected an object of text values, got {attrs!r}")
        attrs = {str(k): str(v) for k, v in attrs.items()}
    template = "{answer}"
    if row.get("template") is not None:
        template = _text(row["template"], where, "template")
        if template.count("{answer}") != 1:
            raise UserError(f"{where}: field 'template': expected exactly one {{answer}}, got {template!r}")
    ktemplate = None
    if row.get("knowledge_template") is not None:
        ktemplate = _text(row["knowledge_template"], where, "knowledge_template")
        if ktemplate.count("{answer}") != 1:
            raise UserError(f"{where}: field 'knowledge_template': expected exactly one {{answer}}, got {ktemplate!r}")
    return Item(id=rid, question=prompt, answer=answer, candidates=cands, attributes=attrs, role=role,
                template=template, source=where, knowledge_template=ktemplate,
                answer_type=None if cands else "answer")


def read_items(files: list[str | Path]) -> list[Item]:
    """Read and validate every row of ``files`` (JSONL, CSV or Parquet).

    Raises:
        UserError: no file given, a malformed row (file, line, field), a duplicate id.
    """
    if not files:
        raise UserError("data.files: the custom suite needs data files; give them with --data FILE "
                        "(JSONL, CSV or Parquet with fields id, prompt, answer, role)")
    items: list[Item] = []
    first: dict[str, str] = {}
    for f in files:
        path = Path(f).expanduser()
        for where, row in _rows(path):
            it = parse_row(row, f"{path}: {where}")
            if it.id in first:
                raise UserError(f"{path}: {where}: field 'id': '{it.id}' already used ({first[it.id]})")
            first[it.id] = it.source
            items.append(it)
    return items


def load(cfg: AuditConfig) -> list[Item]:
    """The user's items from ``data.files``."""
    return read_items(cfg.data.files)


def split(items: list[Item], known: list[bool] | None, cfg: AuditConfig) -> SuiteData:
    """Pools by the ``role`` of each row. Evaluation rows without candidates are ranked
    against the answers of other evaluation rows (seeded); with ``data.filter_known``,
    only evaluation rows the base model answers are kept.

    Raises:
        UserError: no ``align``, ``perturb`` or ``eval`` rows (unless ``perturb.kind`` is
            ``none``), or too few distinct evaluation answers to draw K-1 distractors.
    """
    ok = known if known is not None else [True] * len(items)
    pools: dict[str, list[Item]] = {r: [] for r in ROLES}
    for it, k in zip(items, ok):
        if it.role != "eval" or k:
            pools[it.role].append(it)
    files = ", ".join(cfg.data.files)
    needed = ["align", "eval"] + (["perturb"] if cfg.perturb.kind != "none" else [])
    for r in needed:
        if not pools[r]:
            raise UserError(f"data.files: no row with role '{r}' in {files}")
    if "in_task" in cfg.recover.arms and max(cfg.recover.sizes) > len(pools["recover"]):
        raise UserError(
            f"recover.sizes: {max(cfg.recover.sizes)} is larger than the {len(pools['recover'])} rows with role "
            f"'recover' in {files}"
        )
    K = cfg.data.n_candidates
    answers = sorted({it.answer for it in pools["eval"]} | {a for a in cfg.data.answer_pool if a.strip()})
    for it in pools["eval"]:
        if not it.candidates:
            others = [a for a in answers if a != it.answer]
            if len(others) < K - 1:
                raise UserError(
                    f"{it.source}: field 'candidates': none given, and the eval rows and data.answer_pool have only "
                    f"{len(others)} other distinct answers to rank against (data.n_candidates={K}); give candidates, "
                    f"more answers in data.answer_pool, or a lower data.n_candidates"
                )
            it.candidates = [it.answer, *random.Random(f"{cfg.seed}:{it.id}").sample(others, K - 1)]
    perturb_eval = pools["perturb_eval"]
    notes = {"n_items": len(items), "n_known": sum(ok), "files": list(cfg.data.files)}
    if not perturb_eval:
        perturb_eval = pools["perturb"]
        notes["perturb_eval"] = "no perturb_eval rows: perturb_acc is measured on the perturb rows themselves"
    refusals = bool(pools["perturb"]) and all(is_refusal(it.answer) for it in pools["perturb"])
    irrelevant = pools["irrelevant"] or arithmetic_items(len(pools["recover"]) + 50, cfg.seed)
    return SuiteData(
        eval=pools["eval"], align=pools["align"], perturb=pools["perturb"], perturb_eval=perturb_eval,
        recover=pools["recover"], irrelevant=irrelevant, perturb_matcher="refusal" if refusals else "contains",
        notes=notes,
    )


SUITE = Suite(
    name="custom",
    description="your model (--model: directory, .gguf or hub id) and data files (--data: JSONL/CSV/Parquet)",
    load=load,
    task_matcher="contains",
    default_model="smollm2-135m-instruct",
    perturb_kinds=("data", "none"),
    split=split,
)
