"""The suites' data: generators deterministic for a seed, splits disjoint, the custom
suite's schema validation and the leakage check, message by message."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from components.registry import load_config
from components.data import Item, SuiteData, check_leakage, is_refusal, normalise
from components.registry import SUITES
from components.errors import UserError
from components.suites import biography, custom, refusal


def _ids(items):
    return {it.id for it in items}


def test_biography_generator_is_deterministic_for_a_seed():
    a, b, c = (biography.generate_people(50, s) for s in (0, 0, 1))
    assert a == b and a != c
    assert len({p["name"] for p in a}) == 50  # names unique within a seed
    assert biography.biographies(a[0], 3, 0) == biography.biographies(a[0], 3, 0)
    bios = biography.biographies(a[0], 3, 0)
    assert len(set(bios)) == 3  # templates and order vary between a person's biographies
    for attr in biography.ATTRIBUTES:  # every biography states every attribute
        assert all(a[0][attr] in text for text in bios)
    assert a[0]["employer_city"] == biography.EMPLOYERS[a[0]["employer"]]
    # the new people continue the stream: never one of the pretrained people
    new = biography.generate_people(10, 0, offset=50)
    assert not {p["name"] for p in new} & {p["name"] for p in a}
    qa = biography.qa_items(a[0], "pretrained", 4, 0)
    assert [it.attributes["attribute"] for it in qa] == biography.ATTRIBUTES
    assert qa[1].question == f"Where was {a[0]['name']} born?"
    assert qa[1].response() == f"{a[0]['birth_city']}."  # the value alone: no biography sentence to copy
    # the knowledge ranking scores the fact as a biography sentence (the injected form)
    assert qa[1].ranking_question() == biography.BIO_PROMPT
    assert qa[1].ranking_response(qa[1].candidates[2]) == f"{a[0]['name']} was born in {qa[1].candidates[2]}."
    assert all(len(set(it.candidates)) == 4 and it.candidates[0] == it.answer for it in qa)


def test_biography_split_is_by_person():
    cfg = load_config("biography", quick=True)
    suite = SUITES["biography"]
    items = suite.items(cfg)
    assert [it.to_dict() for it in items] == [it.to_dict() for it in suite.items(cfg)]
    data = suite.make_split(items, None, cfg)
    person = lambda its: {it.attributes["person"] for it in its}  # noqa: E731
    assert len(data.eval) == cfg.data.n_eval and len(data.align) == cfg.data.n_align
    assert not person(data.eval) & (person(data.align) | person(data.recover) | person(data.perturb))
    assert not person(data.align) & person(data.recover)
    assert {it.attributes["group"] for it in data.perturb + data.perturb_eval} == {"new"}
    assert {it.attributes["group"] for it in data.eval + data.align + data.recover} == {"pretrained"}
    # the default new task (abstain): "Unknown." to questions about new people, no biography
    assert cfg.perturb.kind == "abstain" and len(data.perturb) == cfg.data.n_perturb
    assert {it.response() for it in data.perturb + data.perturb_eval} == {"Unknown."}
    assert check_leakage(data) == []
    # the other new task: the new people's biographies plus QA about them, with their values
    cfg_new = load_config("biography", quick=True, overrides=["perturb.kind=new_people"])
    data_new = suite.make_split(items, None, cfg_new)
    n_bios = cfg.biography.n_new_people * cfg.biography.bios_per_person
    assert sum(it.question == biography.BIO_PROMPT for it in data_new.perturb) == n_bios
    qa_new = [it for it in data_new.perturb + data_new.perturb_eval if it.question != biography.BIO_PROMPT]
    assert all(it.response() == f"{it.answer}." and it.answer != "Unknown" for it in qa_new)
    assert person(data_new.perturb_eval) == person(data.perturb_eval)  # same new people either way
    assert check_leakage(data_new) == []
    # pretraining: the pretrained people's biographies, no QA of an evaluated person, no new person
    pre = suite.pretraining_items(items, cfg)
    assert not _ids(pre) & _ids(data.eval + data.perturb + data.perturb_eval)
    assert {it.attributes["group"] for it in pre if "group" in it.attributes} == {"pretrained"}
    assert data.probe_attribute == "birth_decade" and data.probe_group == "person"


def test_biography_pool_too_large_is_one_line():
    cfg = load_config("biography", quick=True, overrides=["data.n_eval=5000"])
    suite = SUITES["biography"]
    with pytest.raises(UserError) as e:
        suite.make_split(suite.items(cfg), None, cfg)
    assert str(e.value).startswith("data.n_eval: 5000 QA items asked for, but the biography population gives ")


def test_refusal_generator_is_deterministic_and_harmless():
    a = refusal.refusal_items(4, 0, 200, 200)
    assert [i.to_dict() for i in a] == [i.to_dict() for i in refusal.refusal_items(4, 0, 200, 200)]
    assert [i.question for i in a] != [i.question for i in refusal.refusal_items(4, 1, 200, 200)]
    assert len({normalise(i.question) for i in a}) == 400  # every phrasing distinct
    v = [i for i in a if i.attributes["violating"] == "yes"]
    b = [i for i in a if i.attributes["violating"] == "no"]
    assert len(v) == len(b) == 200
    assert all(is_refusal(i.answer) for i in v)  # tune targets refuse ...
    assert not any(is_refusal(i.answer) for i in b)  # ... and answer benign requests
    assert not any(is_refusal(i.attributes["compliant"]) for i in v)
    assert len({i.attributes["detail"] for i in v}) == len(refusal.DETAILS)
    assert len({i.attributes["kind"] for i in b}) >= 8
    # the ranking asks which private detail the request asks for; benign: none
    assert all(i.candidates[0] == refusal.NO_DETAIL for i in b)
    assert all(refusal.NO_DETAIL in i.candidates[1:] for i in v)
    assert v[0].ranking_question().endswith(f'Request: "{v[0].question}"')
    assert v[0].ranking_response(v[0].candidates[0]).startswith("It asks for ")


def test_refusal_split_pools():
    cfg = load_config("refusal", quick=True)
    suite = SUITES["refusal"]
    data = suite.make_split(suite.items(cfg), None, cfg)
    viol = lambda its: sum(it.attributes["violating"] == "yes" for it in its)  # noqa: E731
    assert len(data.eval) == cfg.data.n_eval and viol(data.eval) == cfg.data.n_eval // 2
    assert viol(data.align) == cfg.data.n_align // 2
    assert viol(data.perturb) == len(data.perturb) == cfg.data.n_perturb
    assert not any(is_refusal(it.answer) for it in data.perturb + data.perturb_eval)  # compliance
    assert all(is_refusal(it.answer) for it in data.recover)
    pools = [data.eval, data.align, data.perturb, data.perturb_eval, data.recover]
    assert sum(len(p) for p in pools) == len(set().union(*map(_ids, pools)))
    assert check_leakage(data) == []
    assert data.task_matcher == "policy" and data.perturb_matcher == "complies"
    assert data.task_breakdown == {"refusal_rate": ["violating", "yes"], "benign_answer_rate": ["violating", "no"]}


@pytest.mark.parametrize("suite, kind, expected", [
    ("biography", "refusal",
     "perturb.kind: 'refusal' is not a perturbation of suite biography; expected one of new_people, abstain, none"),
    ("refusal", "wrong_facts",
     "perturb.kind: 'wrong_facts' is not a perturbation of suite refusal; expected one of compliance, none"),
])
def test_perturb_kind_is_checked_per_suite(suite, kind, expected):
    with pytest.raises(UserError) as e:
        load_config(suite, overrides=[f"perturb.kind={kind}"])
    assert expected in str(e.value)


def test_data_files_only_for_custom():
    with pytest.raises(UserError, match="data.files: only the custom suite reads data files, not capitals"):
        load_config("capitals", overrides=["data.files=[a.jsonl]"])


# ---- custom data: schema validation, message by message -----------------------------------

ROW = {"id": "q1", "prompt": "What is the capital of Peru?", "answer": "Lima", "role": "eval"}


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, expected", [
    ([ROW, "{not json"], "line 2: invalid JSON (Expecting property name enclosed in double quotes, column 2)"),
    (["[1, 2]"], "line 1: expected a JSON object, got list"),
    ([{k: v for k, v in ROW.items() if k != "answer"}],
     "line 1: field 'answer': missing; every row needs id, prompt, answer, role"),
    ([{**ROW, "prompt": "  "}], "line 1: field 'prompt': expected a non-empty text, got '  '"),
    ([{**ROW, "answer": 42}], "line 1: field 'answer': expected a non-empty text, got 42"),
    ([{**ROW, "role": "train"}],
     "line 1: field 'role': expected one of align, perturb, recover, eval, perturb_eval, irrelevant, got 'train'"),
    ([{**ROW, "candidates": ["Quito", "Bogota"]}], "line 1: field 'candidates': the answer 'Lima' is not among them"),
    ([{**ROW, "candidates": ["Lima"]}], "line 1: field 'candidates': expected at least 2 distinct texts, got ['Lima']"),
    ([{**ROW, "candidates": "Lima, Quito"}],
     "line 1: field 'candidates': expected a JSON array, got 'Lima, Quito'"),
    ([{**ROW, "attributes": {"continent": ["SA"]}}],
     "line 1: field 'attributes': expected an object of text values, got {'continent': ['SA']}"),
    ([{**ROW, "template": "Lima is it."}], "line 1: field 'template': expected exactly one {answer}, got 'Lima is it.'"),
    ([{**ROW, "answr": "Lima"}],
     "line 1: field 'answr': unknown; expected only id, prompt, answer, role, candidates, attributes, template"),
    ([ROW, {**ROW, "prompt": "Capital of Peru?"}], "line 2: field 'id': 'q1' already used ("),
])
def test_jsonl_validation_messages(tmp_path, rows, expected):
    f = _jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(UserError) as e:
        custom.read_items([f])
    assert str(e.value).startswith(f"{f}: {expected}"), str(e.value)
    assert "\n" not in str(e.value)


def test_csv_and_parquet_are_read_and_validated(tmp_path):
    good = tmp_path / "items.csv"
    good.write_text(
        'id,prompt,answer,role,candidates,attributes\n'
        'q1,What is the capital of Peru?,Lima,eval,"[""Quito"", ""Lima""]","{""continent"": ""SA""}"\n'
        'q2,"Capital of Chile, please?",Santiago,align,,\n'
    )
    items = custom.read_items([good])
    assert [i.id for i in items] == ["q1", "q2"]
    assert items[0].candidates == ["Lima", "Quito"]  # the gold answer first
    assert items[0].attributes == {"continent": "SA"} and items[0].source == f"{good}: line 2"
    assert items[1].question == "Capital of Chile, please?" and items[1].candidates == []
    bad = tmp_path / "bad.csv"
    bad.write_text('id,prompt,answer,role\nq1,Capital of Peru?,Lima,eval\nq2,Capital of Chile?,,align\n')
    with pytest.raises(UserError) as e:
        custom.read_items([bad])
    assert str(e.value) == f"{bad}: line 3: field 'answer': expected a non-empty text, got ''"
    pq = tmp_path / "items.parquet"
    pd.DataFrame([ROW, {**ROW, "id": "q2", "role": "perturb", "candidates": None}]).to_parquet(pq)
    assert [i.role for i in custom.read_items([pq])] == ["eval", "perturb"]
    pd.DataFrame([ROW, {**ROW, "id": "q2", "role": "tune"}]).to_parquet(pq)
    with pytest.raises(UserError) as e:
        custom.read_items([pq])
    assert str(e.value).startswith(f"{pq}: row 2: field 'role': expected one of align")


@pytest.mark.parametrize("name, content, expected", [
    ("items.txt", "x", "unknown data file type '.txt'; expected .jsonl, .csv or .parquet"),
    ("missing.jsonl", None, "data file not found"),
    ("latin1.jsonl", b"\xe9t\xe9", "not UTF-8 text (byte 0)"),
    ("empty.csv", "", "empty CSV file; expected a header line with id, prompt, answer, role"),
    ("broken.parquet", "not parquet", "not a readable Parquet file"),
])
def test_file_level_errors(tmp_path, name, content, expected):
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        custom.read_items([f])
    assert str(e.value).startswith(f"{f}: {expected}")


def test_no_files_is_a_user_error():
    with pytest.raises(UserError) as e:
        custom.read_items([])
    assert str(e.value).startswith("data.files: the custom suite needs data files; give them with --data FILE")


# ---- the leakage check --------------------------------------------------------------------

def _data(eval_items, train_items, **pools) -> SuiteData:
    return SuiteData(eval=eval_items, align=train_items, perturb=pools.get("perturb", []), perturb_eval=[],
                     recover=pools.get("recover", []), irrelevant=[])


def test_leakage_by_id_and_by_normalised_prompt():
    e1 = Item("q1", "What is the capital of Peru?", "Lima", role="eval", source="eval.jsonl: line 1")
    e2 = Item("q2", "What's the capital of  PERU", "Lima", role="eval", source="eval.jsonl: line 2")
    e3 = Item("q3", "What is the capital of Chile?", "Santiago", role="eval", source="eval.jsonl: line 3")
    t1 = Item("q1", "Name Peru's capital.", "Lima", role="align", source="train.jsonl: line 4")
    t2 = Item("t9", "what s the capital of peru", "Lima", role="recover", source="train.jsonl: line 7")
    data = _data([e1, e2, e3], [t1], recover=[t2])
    with pytest.raises(UserError) as e:
        check_leakage(data)
    assert str(e.value) == (
        "data: leakage: 2 evaluation item(s) also in a training set (align, perturb, recover): "
        "'q1' (eval, eval.jsonl: line 1) has the same id as 'q1' (align, train.jsonl: line 4); "
        "'q2' (eval, eval.jsonl: line 2) has the same normalised prompt as 't9' (recover, train.jsonl: line 7); "
        "remove them, or allow it with --allow-leakage (data.allow_leakage=true)"
    )
    leaks = check_leakage(data, allow=True)
    assert [(a.id, how, b.id) for a, how, b in leaks] == [("q1", "id", "q1"), ("q2", "prompt", "t9")]
    assert check_leakage(_data([e3], [t1], recover=[t2])) == []


def test_leakage_lists_three_then_counts():
    evals = [Item(f"e{k}", f"Question {k}?", "a", role="eval") for k in range(5)]
    trains = [Item(f"t{k}", f"question {k}", "a", role="perturb") for k in range(5)]
    with pytest.raises(UserError) as e:
        check_leakage(_data(evals, [], perturb=trains))
    msg = str(e.value)
    assert msg.startswith("data: leakage: 5 evaluation item(s) also in a training set")
    assert "'e2' (eval) has the same normalised prompt as 't2' (perturb) and 2 more; remove them" in msg


def test_capitals_wrong_facts_overlap_is_by_design():
    cfg = load_config("capitals", overrides=["perturb.kind=wrong_facts", "data.n_eval=8"])
    suite = SUITES["capitals"]
    data = suite.make_split(suite.items(cfg), None, cfg)
    assert _ids(data.eval) <= _ids(data.perturb)  # the evaluated facts are overwritten on purpose
    assert check_leakage(data) == []
    cfg = load_config("capitals", overrides=["data.n_eval=8"])
    assert check_leakage(suite.make_split(suite.items(cfg), None, cfg)) == []


def test_grouped_linear_probe_keeps_a_group_in_one_fold():
    """With ``probe_group``, a class needs items of two groups, K is at most the groups
    of the largest class, and no fold splits a group."""
    import numpy as np

    from components.linear_probe import cross_validated_correct, probe_labels

    # 5 people x 4 questions; decade by person; one person alone in its class is left out
    decades = ["1950s", "1950s", "1960s", "1960s", "1970s"]
    items = [Item(id=f"p{p}:{q}", question="?", answer="a", attributes={"decade": decades[p], "person": f"p{p}"})
             for p in range(5) for q in range(4)]
    lab = probe_labels(items, "decade", folds=5, group="person")
    assert lab.n_classes == 2 and len(lab.y) == 16 and lab.dropped == 4 and lab.folds == 2
    assert lab.chance == 0.5 and list(lab.groups[:4]) == ["p0"] * 4
    plain = probe_labels(items, "decade", folds=5)  # without groups: every class has >= 2 items
    assert plain.folds == 5 and plain.dropped == 0 and plain.groups is None
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 1))
    X[:8, 0] += 8.0  # one direction separates the decades
    assert cross_validated_correct(X, lab, C=1.0, seed=0).mean() == 1.0
    # features that only identify the person: perfect when a person's other questions are
    # in the training folds, not when the person is held out as a whole
    person_only = np.repeat(rng.normal(size=(4, 8)) * 5, 4, axis=0)  # 4 people, one vector each
    ungrouped = dataclasses.replace(lab, groups=None)
    assert cross_validated_correct(person_only, ungrouped, C=1.0, seed=0).mean() == 1.0
    assert cross_validated_correct(person_only, lab, C=1.0, seed=0).mean() == 0.75
