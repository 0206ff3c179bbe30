"""User mistakes, one row each: exit code 2, one line on stderr that names the file, line
or field and what was expected, no traceback, nothing written to the run folder or to
MLflow. The command is run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY

CAPITALS = ROOT / "components" / "suites" / "capitals.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(tmp: Path) -> dict[str, str]:
    """Input files the mistakes need, written into ``tmp``; name -> path."""
    (tmp / "bad.yaml").write_text("tune:\n  lr: 0.1\n  epochs: [1,\n")
    (tmp / "list.yaml").write_text("- tune\n- perturb\n")
    (tmp / "latin1.yaml").write_bytes("tune:\n  lr: 0.1  # d\xe9j\xe0 vu\n".encode("latin-1"))
    (tmp / "blocker").write_text("a file, not a folder")
    (tmp / "empty_run").mkdir()
    row = {"id": "q1", "prompt": "What is the capital of Peru?", "answer": "Lima", "role": "eval"}
    (tmp / "bad.jsonl").write_text(json.dumps(row) + "\n{not json\n")
    (tmp / "nofield.jsonl").write_text(json.dumps({k: v for k, v in row.items() if k != "answer"}) + "\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.jsonl").write_bytes(b'{"id": "q1", "prompt": "Caf\xe9?"}\n')
    (tmp / "leak.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {**row, "candidates": ["Lima", "Quito", "Bogota", "Caracas"]}, {**row, "id": "a1", "prompt": "What is the capital of Chile?", "answer": "Santiago", "role": "align"},
        {**row, "id": "r1", "prompt": "what is the capital of PERU", "role": "recover"},
        {**row, "id": "p1", "prompt": "2+2=", "answer": "4", "role": "perturb"},
    ]))
    # a GGUF file whose architecture transformers cannot load
    import gguf

    w = gguf.GGUFWriter(str(tmp / "rwkv.gguf"), "rwkv-unknown")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # a model folder with pickled weights only, and one that needs its own Python code
    pickled = tmp / "pickled-model"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    custom_code = tmp / "custom-code-model"
    custom_code.mkdir()
    (custom_code / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (custom_code / "modeling_evil.py").write_text(f"open({str(tmp / 'CODE_RAN')!r}, 'w').write('x')\n")
    (custom_code / "model.safetensors").write_bytes(b"")
    names = ("bad.yaml", "list.yaml", "latin1.yaml", "blocker", "empty_run", "bad.jsonl", "nofield.jsonl",
             "empty.jsonl", "latin1.jsonl", "leak.jsonl", "rwkv.gguf", "pickled-model", "custom-code-model")
    return {k.replace(".", "_").replace("-", "_"): str(tmp / k) for k in names}


# (id, command line with {placeholders}, expected text of the one line)
MISTAKES = [
    ("unknown suite", "run nosuchsuite", "error: suite 'nosuchsuite': unknown; expected one of capitals"),
    ("unknown config key", "run --set tune.nonsense=3", "tune.nonsense: unknown key"),
    ("unknown section", "run --set nosection.lr=3", "nosection: unknown key"),
    ("negative kl_penalty", "run --set perturb.kl_penalty=-0.5",
     "{capitals} + --set: perturb.kl_penalty: Input should be greater than or equal to 0"),
    ("wrong type", "run --set tune.lr=fast", "tune.lr: Input should be a valid number"),
    ("ci level out of range", "run --set probe.ci_level=1.5", "probe.ci_level: Input should be less than 1"),
    ("recovery size larger than the pool", "run --config {tiny} --set recover.sizes=[50]",
     "recover.sizes: 50 is larger than the in-task recovery pool data.n_recover_pool=6"),
    ("--set without =", "run --set tune.lr", "error: --set tune.lr: expected key=value, e.g. perturb.kl_penalty=0.1"),
    ("config file not found", "run --config does/not/exist.yaml", "error: does/not/exist.yaml: config file not found"),
    ("config file invalid YAML", "run --config {bad_yaml}", "error: {bad_yaml}: line 4: invalid YAML (expected the node content"),
    ("config file not a mapping", "run --config {list_yaml}",
     "error: {list_yaml}: expected a mapping of config sections, got list"),
    ("config file not UTF-8", "run --config {latin1_yaml}", "error: {latin1_yaml}: not UTF-8 text (byte 20)"),
    ("model path does not exist", "run --set model.id=/no/such/model",
     "error: model.id: '/no/such/model' is neither smollm2-135m-instruct, tiny-llama nor an existing local directory"),
    ("output folder not writable", "run --config {tiny} --out {blocker}/sub",
     "error: --out {blocker}/sub: output folder not writable"),
    ("tracking server down at start", "run --config {tiny} --tracking-uri http://127.0.0.1:{port}",
     "error: --tracking-uri http://127.0.0.1:{port}: MLflow tracking store not reachable"),
    ("registered-model name with a slash", "run --config {tiny} --register a/b",
     "error: --register 'a/b': expected a registered-model name without '/' or ':'"),
    ("show: no such run", "show /no/such/run", "error: /no/such/run/summary.json: not found"),
    ("report: no such run", "report /no/such/run",
     "error: /no/such/run: not a folder; expected the folder of a finished run"),
    ("verify: a folder without a manifest", "verify {empty_run}", "{empty_run}/manifest.json"),
    ("sync: no such folder", "sync /no/such/run",
     "error: /no/such/run: not a folder; expected the folder of an audit run"),
    ("sweep: unknown search", "sweep --config {tiny} --set sweep.search=bogus", "sweep.search: Input should be"),
    ("sweep: empty grid", "sweep --config {tiny} --set sweep.kl_penalty=[]", "sweep.kl_penalty"),
    ("compile: unknown suite", "compile nosuchsuite", "error: suite 'nosuchsuite': unknown"),
    # the environment (NAME=value before the command)
    ("unknown allocator", "CL_AUDIT_MALLOC=jemalloc run --config {tiny}",
     "error: CL_AUDIT_MALLOC='jemalloc': expected one of mimalloc, system"),
    ("sweep: unknown allocator", "CL_AUDIT_MALLOC=tcmalloc sweep --config {tiny}",
     "error: CL_AUDIT_MALLOC='tcmalloc': expected one of mimalloc, system"),
    # the user's data (custom suite)
    ("malformed JSONL line", "run custom --data {bad_jsonl}",
     "error: {bad_jsonl}: line 2: invalid JSON (Expecting property name enclosed in double quotes, column 2)"),
    ("missing field", "run custom --data {nofield_jsonl}",
     "error: {nofield_jsonl}: line 1: field 'answer': missing; every row needs id, prompt, answer, role"),
    ("empty data file", "run custom --data {empty_jsonl}",
     "error: {empty_jsonl}: empty data file; expected one JSON object per line with id, prompt, answer, role"),
    ("data file not UTF-8", "run custom --data {latin1_jsonl}", "error: {latin1_jsonl}: not UTF-8 text (byte 27)"),
    ("data file not found", "run custom --data /no/such/items.jsonl",
     "error: /no/such/items.jsonl: data file not found"),
    ("recovery items leak into evaluation", "run custom --data {leak_jsonl} --set recover.sizes=[1]",
     "error: data: leakage: 1 evaluation item(s) also in a training set (align, perturb, recover): 'q1' (eval, "),
    # the user's model
    ("hub id while offline", "run capitals --model someorg/some-model",
     "error: model.id: 'someorg/some-model' is no local path and looks like a Hugging Face Hub id, but "
     "HF_HUB_OFFLINE is set"),
    ("GGUF of an unsupported architecture", "run capitals --config {tiny} --model {rwkv_gguf}",
     "error: model.id: {rwkv_gguf}: cannot load it as a GGUF causal language model"),
    ("pickled weights only", "run capitals --config {tiny} --model {pickled_model}",
     "error: model.id: {pickled_model}: no .safetensors weights (pickled .bin weights are not loaded)"),
    ("model that needs its own code", "run capitals --config {tiny} --model {custom_code_model}",
     "error: model.id: {custom_code_model}: the model needs its own Python code (auto_map in config.json); "
     "it is not run unless model.trust_remote_code=true"),
]


@pytest.mark.parametrize("args, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_user_mistake_exits_2_with_one_line_and_writes_nothing(args, expected, tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    values = {**_files(tmp_path), "tiny": str(TINY), "capitals": str(CAPITALS), "port": str(_free_port())}
    argv = args.format(**values).split()
    env_set = {}
    while argv and "=" in argv[0] and argv[0].split("=")[0].isupper():  # NAME=value before the command
        k, v = argv.pop(0).split("=", 1)
        env_set[k] = v
    if argv[0] in ("run", "sweep") and "--out" not in argv:
        argv += ["--out", str(out)]
    env = {**os.environ, "CL_AUDIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS", "CL_AUDIT_MALLOC"):
        env.pop(k, None)
    env.update(env_set)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert expected.format(**values) in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    # nothing written: no file in the run folder, no run in the tracking store
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    assert not (tmp_path / "CODE_RAN").exists()  # a model's own Python code never ran
    db = home / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone() == (0,)


def _own_home(home: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    """A fresh home (store, MLflow) sharing the session's model cache, a run folder, and
    the environment of a ``cl-audit`` process that uses them."""
    h, out = tmp_path / "home", tmp_path / "out"
    h.mkdir()
    (home / "cache").mkdir(exist_ok=True)
    (h / "cache").symlink_to(home / "cache", target_is_directory=True)
    env = {**os.environ, "CL_AUDIT_HOME": str(h), "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CL_AUDIT_FAILPOINTS"):
        env.pop(k, None)
    return h, out, env


def test_diverged_training_stops_the_stage_and_keeps_the_earlier_artifacts(home, tmp_path):
    """A loss that becomes NaN: one line naming the stage and the step, exit 2; the stage
    publishes nothing, the stages before it stay in the store, no summary is written."""
    h, out, env = _own_home(home, tmp_path)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), "--out", str(out),
                        "--set", "perturb.lr=1e30"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert lines[0].startswith("error: perturbed: loss became nan at step ")
    assert lines[0].endswith("(lr=1e+30); stage stopped, earlier artifacts kept")
    kinds = sorted(p.name.split("-")[0] for p in (h / "store").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert "tune" in kinds and "perturb" not in kinds
    assert not (out / "summary.json").exists()


def test_non_finite_weights_stop_the_stage_and_keep_the_earlier_artifacts(home, tmp_path):
    """The perturb stage's one optimiser step overflows (AdamW's decay factor ``1 - lr *
    weight_decay`` takes the norm weights beyond float32's range): its loss (before the
    update) is finite, the weights after it are not (issue 23, item 8). One line naming
    the stage and the step, exit 2; the stage publishes nothing and is never probed, the
    tune stage stays in the store, no summary is written."""
    h, out, env = _own_home(home, tmp_path)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(TINY), "--out", str(out),
                        "--set", "tune.method=full", "--set", "perturb.method=full", "--set", "perturb.lr=3.4e37",
                        "--set", "perturb.weight_decay=10", "--set", "perturb.epochs=1",
                        "--set", "perturb.batch_size=64"],
                       check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert lines[0].startswith("error: perturbed: weights became non-finite after step 0 ("), lines[0]
    assert lines[0].endswith(", lr=3.4e+37); stage stopped, earlier artifacts kept"), lines[0]
    kinds = sorted(p.name.split("-")[0] for p in (h / "store").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert "tune" in kinds and "perturb" not in kinds and "recover" not in kinds
    assert not [p for p in (h / "store").iterdir() if p.name.startswith(".perturb-")]  # no temporary folder left
    assert not (out / "summary.json").exists()
