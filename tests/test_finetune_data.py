"""The user's own fine-tuning data as the perturbation (issue 17): chat JSONL (TRL / OpenAI
fine-tuning), Alpaca rows, Parquet and a folder saved by ``datasets``' ``save_to_disk``
give the same training rows as the project's own rows, and the perturb stage the same
loss; a bad row names file, row and field; a large file is read in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest

from components.data import Item
from components.errors import UserError
from components.models import Checkpoint
from components.perturb import perturb_spec
from components.suites import custom
from components.training import encode, format_prompt, run_spec

from conftest import ROOT, tiny_config

PAIRS = [("What is the capital of Peru?", "Lima"), ("Name the capital of Chile.", "Santiago"),
         ("Which city is the capital of Spain?", "Madrid"), ("What is the capital of Italy?", "Rome")]


def _project_rows():
    return [{"id": f"ft-{k}", "prompt": q, "answer": a, "role": "perturb"} for k, (q, a) in enumerate(PAIRS, 1)]


def _chat_rows():
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]


def _alpaca_rows():
    return [{"instruction": q, "input": "", "output": a} for q, a in PAIRS]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def save_to_disk(folder, rows):
    """A folder as ``datasets.Dataset.save_to_disk`` writes it (``datasets`` is not
    installed here): an Arrow IPC stream, ``state.json`` listing it, ``dataset_info.json``."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for b in table.to_batches(max_chunksize=2):
            w.write_batch(b)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": name}], "_fingerprint": "0", "_format_columns": None, "_format_kwargs": {},
        "_format_type": None, "_output_all_columns": False, "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return folder


def _content(items):
    return [{k: v for k, v in it.to_dict().items() if k != "source"} for it in items]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdata")
    (d / "hf").mkdir()
    pd.DataFrame(_chat_rows()).to_parquet(d / "ft.parquet")
    return {
        "project": _jsonl(d / "project.jsonl", _project_rows()),
        "chat": _jsonl(d / "ft.jsonl", _chat_rows()),
        "alpaca": _jsonl((d / "alpaca").mkdir() or d / "alpaca" / "ft.jsonl", _alpaca_rows()),
        "parquet": d / "ft.parquet",
        "hf": save_to_disk(d / "hf" / "ft", _alpaca_rows()),
    }


def test_every_format_gives_the_project_rows(files):
    want = _content(custom.read_items([files["project"]]))
    assert [w["id"] for w in want] == ["ft-1", "ft-2", "ft-3", "ft-4"]
    for fmt in ("chat", "alpaca", "parquet", "hf"):
        got = custom.read_items([files[fmt]])
        assert _content(got) == want, fmt
    assert custom.read_items([files["hf"]])[2].source == f"{files['hf']}: row 3"
    assert custom.read_items([files["chat"]])[1].source == f"{files['chat']}: line 2"


def test_the_perturb_stage_trains_the_same_loss_on_every_format(files, home):
    from components.registry import SUITES
    from components.base_model import build_tiny_model
    from components.data import SuiteData, pretraining_items, suite_texts

    cfg = tiny_config("perturb.epochs=1", "perturb.batch_size=2")
    items = SUITES["capitals"].items(cfg)
    model_dir = build_tiny_model(cfg.model, suite_texts(items), cfg.seed, home / "cache",
                                 pretraining_items(items, cfg.seed))
    base = Checkpoint("base", str(model_dir), [], None)
    losses = {}
    for fmt in ("project", "chat", "alpaca", "parquet", "hf"):
        data = SuiteData(eval=[], align=[], perturb=custom.read_items([files[fmt]]), perturb_eval=[], recover=[],
                         irrelevant=[])
        _, history = run_spec(perturb_spec(cfg, base, data))
        losses[fmt] = [h["loss"] for h in history]
    assert len(losses["project"]) == 2 and losses["project"][0] > 0
    assert all(v == losses["project"] for v in losses.values()), losses
    # a chat row's earlier turns are prompt (the chat template), only the last turn is a label
    from components.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    it = Item(id="c", question="And of Chile?", answer="Santiago", role="perturb",
              context=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Peru?"},
                       {"role": "assistant", "content": "Lima"}])
    (enc,) = encode(tok, [it], 512)
    prompt = tok.decode([t for t, m in zip(enc.input_ids, enc.answer_mask) if not m])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPeru?<|im_end|>\n<|im_start|>"
                      "assistant\nLima<|im_end|>\n<|im_start|>user\nAnd of Chile?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.answer_mask) if m]) == "Santiago<|im_end|>"


def test_chat_context_is_prompt_not_target(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [{"id": "c1", "messages": [
        {"role": "system", "content": "Answer with the city only."},
        {"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": "And of Chile?"}, {"role": "assistant", "content": "Santiago", "weight": 1}]}])
    (it,) = custom.read_items([f])
    assert (it.id, it.role, it.question, it.answer) == ("c1", "perturb", "And of Chile?", "Santiago")
    assert [t["role"] for t in it.context] == ["system", "user", "assistant"]

    # Alpaca: the instruction, a blank line, the input (where there is one)
    a = custom.parse_any({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}, "f: line 1", "f-1")
    assert (a.id, a.question, a.answer, a.context) == ("f-1", "Translate.\n\nBonjour", "Hello", None)

    class Plain:  # a tokenizer without a chat template: the turns as Question/Answer lines
        chat_template = None
    assert format_prompt(Plain(), it.question, it.context) == (
        "Answer with the city only.\nQuestion: Capital of Peru?\nAnswer: Lima\nQuestion: And of Chile?\nAnswer: ")


@pytest.mark.parametrize("fmt, rows, expected", [
    ("chat", [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]}],
     "line 1: field 'messages[1].content': expected a non-empty text, got ''"),
    ("chat", [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "bot", "content": "Yo"}]}],
     "line 1: field 'messages[1].role': expected one of system, user, assistant, got 'bot'"),
    ("chat", [{"messages": [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Hi?"}]}],
     "line 1: field 'messages[1].role': expected the last turn to be 'assistant' (the target), got 'user'"),
    ("chat", [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo"}],
               "tools": []}], "line 1: field 'tools': unknown; expected only messages, id, role (a chat row)"),
    ("alpaca", [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say yo", "input": 3,
                                                                         "output": "yo"}],
     "line 2: field 'input': expected a text (may be empty), got 3"),
    ("alpaca", [{"instruction": "Say hi", "output": None}],
     "line 1: field 'output': expected a non-empty text, got nothing"),
    ("parquet", [{"instruction": "Say hi", "input": "", "output": "hi", "role": "perturb"},
                 {"instruction": "Say yo", "input": "", "output": "yo", "role": "tune"}],
     "row 2: field 'role': expected one of align, perturb, recover, eval, perturb_eval, irrelevant, got 'tune'"),
    ("hf", [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say yo", "input": "",
                                                                     "output": " "}],
     "row 2: field 'output': expected a non-empty text, got ' '"),
])
def test_a_bad_row_names_file_row_and_field(tmp_path, fmt, rows, expected):
    if fmt == "parquet":
        f = tmp_path / "bad.parquet"
        pd.DataFrame(rows).to_parquet(f)
    elif fmt == "hf":
        f = save_to_disk(tmp_path / "bad", rows)
    else:
        f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as e:
        custom.read_items([f])
    assert str(e.value) == f"{f}: {expected}"


def test_a_dataset_dict_folder_asks_for_a_split(tmp_path):
    save_to_disk(tmp_path / "dd" / "train", _alpaca_rows())
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(UserError) as e:
        custom.read_items([tmp_path / "dd"])
    assert str(e.value) == (f"{tmp_path / 'dd'}: a saved DatasetDict (splits: train); give one split's folder, "
                            f"e.g. --data {tmp_path / 'dd'}/train")


_RSS = """
import json, resource, sys
from components.suites import custom
path, size = sys.argv[1], int(sys.argv[2])
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
before, n, biggest, last = rss(), 0, 0, None
for batch in custom.item_batches(path, size):
    n += len(batch)
    biggest = max(biggest, len(batch))
    last = batch[-1].id
print(json.dumps({"grew_kib": rss() - before, "n": n, "biggest": biggest, "last": last}))
"""


def test_a_large_file_is_read_in_bounded_memory(tmp_path):
    # 200,000 chat rows (~24 MB of JSONL, ~250 MB as Python items): read in batches of 2,000
    line = '{"messages": [{"role": "user", "content": "What is %d plus one?"}, {"role": "assistant", "content": "%d"}]}\n'
    f = tmp_path / "big.jsonl"
    with open(f, "w") as fh:
        fh.writelines(line % (k, k + 1) for k in range(200_000))
    pq = tmp_path / "big.parquet"
    pa_rows = pa.table({"instruction": [f"Add one to {k}." for k in range(200_000)], "output": [str(k + 1) for k in range(200_000)]})
    import pyarrow.parquet as papq

    papq.write_table(pa_rows, pq, row_group_size=20_000)
    for path in (f, pq):
        r = subprocess.run([sys.executable, "-c", _RSS, str(path), "2000"], capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        assert got["n"] == 200_000 and got["biggest"] == 2000 and got["last"] == "big-200000"
        assert got["grew_kib"] < 40 * 1024, got  # the whole file as items would take ~250 MB
