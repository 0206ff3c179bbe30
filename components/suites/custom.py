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

Fine-tuning data can also be given as it is kept (:func:`parse_chat`, :func:`parse_alpaca`):
chat rows (``messages``: the last, assistant turn is the target, earlier turns are
context), Alpaca rows (``instruction``, ``input``, ``output``), in JSONL, Parquet or a folder
written by ``datasets``' ``save_to_disk``; such rows are ``perturb`` rows unless they carry
a ``role``. Files are read in batches (:func:`row_batches`), never whole.

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


BATCH_ROWS = 4096  # rows per batch read from a file (a file is never held whole in memory)


def _batched(rows: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    batch: list[tuple[str, Any]] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _arrow_batches(path: Path, batches: Iterator[Any], size: int) -> Iterator[list[tuple[str, Any]]]:
    """``(row N, row)`` batches from pyarrow record batches (rows counted from 1 over the file)."""
    n = 0
    for rb in batches:
        for s in range(0, rb.num_rows, size):
            rows = rb.slice(s, size).to_pylist()
            yield [(f"row {n + k}", r) for k, r in enumerate(rows, start=1)]
            n += len(rows)
    if n == 0:
        raise UserError(f"{path}: empty data file; expected rows with {', '.join(REQUIRED)} (or messages, or "
                        "instruction and output)")


def _hf_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a folder written by ``datasets``' ``Dataset.save_to_disk``
    (``state.json`` lists them under ``_data_files``).

    Raises:
        UserError: a ``DatasetDict`` folder (one split must be named) or a folder that is
            no saved dataset.
    """
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits") or []
        except (OSError, ValueError):
            splits = []
        one = f"{path}/{splits[0]}" if splits else f"{path}/<split>"
        raise UserError(f"{path}: a saved DatasetDict (splits: {', '.join(splits) or '?'}); give one split's "
                        f"folder, e.g. --data {one}")
    state = path / "state.json"
    try:
        names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: a folder, but not a Hugging Face dataset saved with save_to_disk (no readable "
                        "state.json listing _data_files); expected .jsonl, .csv or .parquet files or such a "
                        "folder") from None
    files = [path / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: state.json lists {missing[0]}, which is not in the folder")
    return files


def _hf_dataset_batches(path: Path, size: int) -> Iterator[list[tuple[str, Any]]]:
    import pyarrow as pa

    def batches():
        for f in _hf_dataset_files(path):
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(f)))  # what save_to_disk writes
            except pa.ArrowInvalid:
                try:
                    reader = pa.ipc.open_file(pa.memory_map(str(f)))
                except pa.ArrowInvalid as e:
                    raise UserError(f"{f}: not a readable Arrow file ({str(e).splitlines()[0][:120]})") from None
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
                continue
            yield from reader

    yield from _arrow_batches(path, batches(), size)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    seen = False
    offset = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte {offset + e.start}) on line {n}") from None
            offset += len(raw)
            if not line.strip():
                continue
            seen = True
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            yield f"line {n}", row
    if not seen:
        raise UserError(f"{path}: empty data file; expected one JSON object per line with {', '.join(REQUIRED)} "
                        "(or messages, or instruction and output)")


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as fh:
        try:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise UserError(f"{path}: empty CSV file; expected a header line with {', '.join(REQUIRED)}")
            for row in reader:
                if None in row:
                    raise UserError(f"{path}: line {reader.line_num}: more values than header columns")
                yield f"line {reader.line_num}", {k: v for k, v in row.items() if v != "" or k in REQUIRED}
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start} of a block)") from None


def row_batches(path: Path, size: int = BATCH_ROWS) -> Iterator[list[tuple[str, Any]]]:
    """The rows of one data file, ``size`` at a time: lists of ``(where, row)``, ``where``
    being ``line N`` (JSONL, CSV) or ``row N`` (Parquet, a saved Hugging Face dataset).

    The file is streamed: JSONL and CSV line by line, Parquet by record batches
    (``pyarrow.parquet.ParquetFile.iter_batches``), a ``save_to_disk`` folder by the
    record batches of its memory-mapped Arrow files; at most one batch of rows is held.

    Raises:
        UserError: missing file, unknown extension, unreadable or malformed file.
    """
    if path.is_dir():
        yield from _hf_dataset_batches(path, size)
        return
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown data file type '{path.suffix}'; expected .jsonl, .csv or .parquet, or a "
                        "folder written by datasets' save_to_disk")
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
        yield from _arrow_batches(path, pf.iter_batches(batch_size=size), size)
        return
    yield from _batched(_jsonl_rows(path) if fmt == "jsonl" else _csv_rows(path), size)


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


CHAT_TURNS = ("system", "user", "assistant")
CHAT_FIELDS = ("messages", "id", "role")
ALPACA_FIELDS = ("instruction", "input", "output", "id", "role")


def _only(row: dict, where: str, allowed: tuple[str, ...], what: str) -> None:
    extra = sorted(k for k in set(row) - set(allowed) if row[k] is not None)
    if extra:
        raise UserError(f"{where}: field '{extra[0]}': unknown; expected only {', '.join(allowed)} ({what})")


def _id_role(row: dict, where: str, default_id: str) -> tuple[str, str]:
    rid = row.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    rid = default_id if rid is None else _text(rid, where, "id")
    role = "perturb" if row.get("role") is None else row["role"]
    if role not in ROLES:
        raise UserError(f"{where}: field 'role': expected one of {', '.join(ROLES)}, got {role!r}")
    return rid, role


def parse_chat(row: dict, where: str, default_id: str) -> Item:
    """A chat row, as TRL and the OpenAI fine-tuning format keep it: ``{"messages":
    [{"role": "system" | "user" | "assistant", "content": text}, ...]}``. The last turn
    (the assistant's) is the target, the user turn before it the question, every earlier
    turn context (:attr:`Item.context`, not trained on). Optional ``id`` (default
    ``default_id``) and ``role`` (default ``perturb``: fine-tuning data is the
    perturbation). A turn may carry ``name`` and ``weight`` (OpenAI), which are not used.

    Raises:
        UserError: ``{where}: field 'messages[i].content': expected ...`` for the first problem.
    """
    _only(row, where, CHAT_FIELDS, "a chat row")
    rid, role = _id_role(row, where, default_id)
    msgs = row["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise UserError(f"{where}: field 'messages': expected a list of at least a user and an assistant turn, "
                        f"got {msgs!r}"[:300])
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f"{where}: field 'messages[{i}]': expected an object with role and content, got {m!r}")
        extra = sorted(k for k in set(m) - {"role", "content", "name", "weight"} if m[k] is not None)
        if extra:
            raise UserError(f"{where}: field 'messages[{i}].{extra[0]}': unknown; expected role, content")
        if m.get("role") not in CHAT_TURNS:
            raise UserError(f"{where}: field 'messages[{i}].role': expected one of {', '.join(CHAT_TURNS)}, "
                            f"got {m.get('role')!r}")
        turns.append({"role": m["role"], "content": _text(m.get("content"), where, f"messages[{i}].content")})
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: field 'messages[{len(turns) - 1}].role': expected the last turn to be "
                        f"'assistant' (the target), got {turns[-1]['role']!r}")
    if turns[-2]["role"] != "user":
        raise UserError(f"{where}: field 'messages[{len(turns) - 2}].role': expected a 'user' turn before the "
                        f"target, got {turns[-2]['role']!r}")
    return Item(id=rid, question=turns[-2]["content"], answer=turns[-1]["content"], role=role, source=where,
                context=turns[:-2] or None, answer_type="answer")


def parse_alpaca(row: dict, where: str, default_id: str) -> Item:
    """An Alpaca-style row ``{"instruction", "input", "output"}``: the user turn is the
    instruction, followed by a blank line and the input where the input is not empty;
    the target is the output. Optional ``id`` and ``role`` as in :func:`parse_chat`.

    Raises:
        UserError: ``{where}: field '<name>': expected ...`` for the first problem.
    """
    _only(row, where, ALPACA_FIELDS, "an Alpaca row")
    rid, role = _id_role(row, where, default_id)
    instruction = _text(row.get("instruction"), where, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"{where}: field 'input': expected a text (may be empty), got {extra!r}")
    output = _text(row.get("output"), where, "output")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return Item(id=rid, question=prompt, answer=output, role=role, source=where, answer_type="answer")


def parse_any(row: dict, where: str, default_id: str) -> Item:
    """One row in any of the accepted shapes: a chat row (``messages``,
    :func:`parse_chat`), an Alpaca row (``instruction``, :func:`parse_alpaca`), or the
    project's own schema (:func:`parse_row`).

    Raises:
        UserError: one line naming ``where``, the field and what was expected.
    """
    if row.get("messages") is not None:
        return parse_chat(row, where, default_id)
    if row.get("instruction") is not None:
        return parse_alpaca(row, where, default_id)
    return parse_row(row, where)


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


def item_batches(path: str | Path, size: int = BATCH_ROWS) -> Iterator[list[Item]]:
    """The validated items of one data file, ``size`` rows at a time (:func:`row_batches`;
    each row by :func:`parse_any`). A chat or Alpaca row without an ``id`` gets
    ``<file stem>-<row number>`` (rows counted from 1, blank lines not counted).

    Raises:
        UserError: a malformed file or row (file, line or row, field).
    """
    path = Path(path).expanduser()
    k = 0
    for batch in row_batches(path, size):
        out = []
        for where, row in batch:
            k += 1
            out.append(parse_any(row, f"{path}: {where}", f"{path.stem}-{k}"))
        yield out


def read_items(files: list[str | Path]) -> list[Item]:
    """Read and validate every row of ``files`` (JSONL, CSV, Parquet, or folders saved by
    ``datasets``' ``save_to_disk``), batch by batch (:func:`item_batches`).

    Raises:
        UserError: no file given, a malformed row (file, line, field), a duplicate id.
    """
    if not files:
        raise UserError("data.files: the custom suite needs data files; give them with --data FILE "
                        "(JSONL, CSV or Parquet with fields id, prompt, answer, role)")
    items: list[Item] = []
    first: dict[str, str] = {}
    for f in files:
        for batch in item_batches(f):
            for it in batch:
                if it.id in first:
                    where = it.source
                    raise UserError(f"{where}: field 'id': '{it.id}' already used ({first[it.id]})")
                first[it.id] = it.source
            items.extend(batch)
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
    if {"in_task", "in_context"} & set(cfg.recover.arms) and max(cfg.recover.sizes) > len(pools["recover"]):
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
