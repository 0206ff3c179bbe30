"""Every checkpoint of an audit as an MLflow logged model in the ``python_function`` flavor.

``mlflow.pyfunc.load_model("models:/<name>/<version>")`` (or ``runs:/<stage run>/model``,
``models:/<model id>``) gives a model whose ``predict`` answers questions greedily
exactly as the audit's probe does (:func:`components.metrics.generate_answers`: the
model's chat template, left padding, the audit's ``probe.batch_size``,
``probe.max_new_tokens`` and ``model.precision``), so a list of the evaluation
questions in their order gives the ``response`` column of ``predictions/<stage>.parquet``.

What the logged model holds (safetensors only, no pickle: the model is logged "from
code", :data:`CODE` is the file MLflow keeps and runs at load time):

- ``tokenizer/``: the base model's folder without its weights (config, tokenizer files);
- ``base/``: the base model's weights, when they are small (at most :data:`EMBED_BASE_MB`,
  e.g. ``tiny-llama``); a larger base model (SmolLM2, a GGUF file, a hub id) is named
  by ``model.id`` and its weights' sha256 in the model config instead and rebuilt
  offline at load time in ``<CL_AUDIT_HOME>/cache`` (the packaged SmolLM2 GGUF is
  dequantised again; a digest that differs is refused);
- ``adapter_0`` ... ``adapter_<k>``: the LoRA adapters merged in order onto the base
  model (tune, perturb, recover), or ``weights/`` for full fine-tuning.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow.pyfunc

CODE = Path(__file__).resolve().parent / "checkpoint_model_code.py"
EMBED_BASE_MB = 64  # base weights up to this size travel inside each logged model
FLAVOR = "python_function"
MODEL_TYPE = "cl-audit-checkpoint"
LOG_MODEL = "cl_audit.log_model"  # the journal's record of a logged model that waits (pipelines.journal)


# MLflow asks, when a PythonModel subclass is defined, for type hints on ``predict`` (they
# would switch on its input validation, which the list-or-DataFrame input here does not
# want); it resets the warning filters to say so, which a filter cannot silence, and the
# request would reach every audit's terminal: what it says while the class is made is dropped.
with warnings.catch_warnings(record=True):
    class CheckpointModel(mlflow.pyfunc.PythonModel):
        """An audited checkpoint that answers questions greedily, as the audit's probe does.

        ``predict(context, model_input)``: ``model_input`` is a list of question strings, a
        pandas DataFrame with a ``question`` column, or a single string; returns one greedy
        answer (str, special tokens removed, stripped) per question, in order. Batches of
        ``probe.batch_size`` questions sorted by prompt length, as in the audit, so the
        same list of questions gives the same answers (Zheng et al. 2025, exact match).

        Raises (at load):
            ValueError: the rebuilt base model's weights differ from the audited ones.
        """

        def load_context(self, context) -> None:
            from components.models import Checkpoint, load_checkpoint

            conf = context.model_config
            arts = context.artifacts
            base = arts.get("base") or _resolve_base(conf)
            tok_dir = arts.get("tokenizer") or base
            adapters = [arts[f"adapter_{i}"] for i in range(int(conf.get("n_adapters", 0)))]
            ckpt = Checkpoint(conf.get("checkpoint", ""), str(base), adapters, arts.get("weights"))
            self.model, _ = load_checkpoint(ckpt, trust_remote_code=False)
            from components.models import load_tokenizer

            self.tok = load_tokenizer(tok_dir, trust_remote_code=False)
            self.conf = conf

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
            from components.metrics import generate_answers

            questions = _questions(model_input)
            c = self.conf
            # an in_context checkpoint: the audit's few-shot turns before every question
            items = [SimpleNamespace(question=q, context=list(c.get("context") or []) or None) for q in questions]
            return generate_answers(self.model, self.tok, items, int(c["batch_size"]), int(c["max_new_tokens"]),
                                    c.get("precision", "fp32"))


def _questions(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a DataFrame: the question column, else the first one
        col = "question" if "question" in model_input.columns else model_input.columns[0]
        return [str(q) for q in model_input[col].tolist()]
    if isinstance(model_input, dict):
        return [str(q) for q in model_input["question"]]
    return [str(q) for q in model_input]


def _resolve_base(conf: dict) -> str:
    """The base model's folder, rebuilt offline from ``model.id`` (not embedded: too large).

    Raises:
        ValueError: its weights' sha256 is not the audited one.
    """
    from components.base_model import resolve_model
    from components.config import ModelConfig
    from components.models import model_digest
    from pipelines.mlflow_env import default_home

    path = resolve_model(ModelConfig(id=conf["model_id"]), default_home() / "cache", [], 0)
    got = model_digest(path)
    if got != conf["model_digest"]:
        raise ValueError(f"base model {conf['model_id']}: weights sha256 {got[:16]}... differ from the audited "
                         f"{conf['model_digest'][:16]}...")
    return str(path)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2 ** 20


def save_checkpoint_model(path: Path, mlflow_model, checkpoint: dict, settings: dict, work: Path) -> None:
    """Write the MLflow model folder of one checkpoint into ``path`` (must not exist).

    Args:
        mlflow_model: the ``mlflow.models.Model`` to write (its run; the logged model's id
            is filled in by :func:`upload_model`).
        checkpoint: the stage's :class:`components.models.Checkpoint` as a dict
            (``name``, ``base_dir``, ``adapters``, ``full_dir``).
        settings: ``model_id``, ``model_digest``, ``batch_size``, ``max_new_tokens``,
            ``precision`` (the audit's), and for an ``in_context`` stage its few-shot
            ``context`` turns, written to the model config.
        work: a scratch folder (the tokenizer folder is assembled there).
    """
    import mlflow

    base = Path(checkpoint["base_dir"])
    tok = Path(work) / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and not f.name.startswith("."):
            shutil.copy2(f, tok / f.name)
    artifacts = {"tokenizer": str(tok)}
    adapters = list(checkpoint.get("adapters") or [])
    if checkpoint.get("full_dir"):
        artifacts["weights"] = str(checkpoint["full_dir"])
        adapters = []
    elif _size_mb(base) <= EMBED_BASE_MB:
        artifacts["base"] = str(base)
    for i, a in enumerate(adapters):
        artifacts[f"adapter_{i}"] = str(a)
    # MLflow keeps each artifact under its folder's own name: every adapter folder is
    # called "adapter", so each is copied to a folder named by its key first
    for key, src in list(artifacts.items()):
        if key != "tokenizer":
            dst = Path(work) / key
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
            artifacts[key] = str(dst)
    conf = {**settings, "checkpoint": checkpoint["name"], "n_adapters": len(adapters),
            "base_embedded": "base" in artifacts or "weights" in artifacts}
    mlflow.pyfunc.save_model(
        str(path), python_model=str(CODE), artifacts=artifacts, mlflow_model=mlflow_model, model_config=conf,
        pip_requirements=_requirements(),
    )
    (Path(path) / "cl_audit_checkpoint.json").write_text(json.dumps(conf, indent=1))


def upload_model(client, run_id: str, name: str, local: str, settings: dict[str, str], tags: dict[str, str]) -> str:
    """Log the saved model folder ``local`` of checkpoint ``name`` as an MLflow logged
    model produced by run ``run_id``: created, listed among the run's outputs (step 0),
    its ``MLmodel`` given the model's id, uploaded (also as the run's ``model``
    artifact, for ``runs:/<run>/model``), marked READY. A READY logged model of the run
    that exists already (a replayed journal) is kept and its id returned.

    Returns:
        The logged model's id.

    Raises:
        MlflowException: the store refused a record or could not be reached.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    run = client.get_run(run_id)
    exp = run.info.experiment_id
    found = [m for m in client.search_logged_models([exp], f"tags.`cl_audit.stage_run_id` = '{run_id}'", max_results=10)
             if str(m.status).endswith("READY")]
    if found:
        return found[0].model_id
    lm = client.create_logged_model(
        exp, name=name.replace("/", "-"), source_run_id=run_id, model_type=MODEL_TYPE, params=settings,
        tags={"cl_audit.stage": name, "cl_audit.stage_run_id": run_id, "mlflow.loggedModel.flavor": FLAVOR, **tags})
    client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=0)])
    path = Path(local) / "MLmodel"
    mm = Model.load(str(path))
    mm.model_id = mm.model_uuid = lm.model_id
    mm.artifact_path = lm.artifact_location
    mm.run_id = run_id
    mm.save(str(path))
    client.log_model_artifacts(lm.model_id, str(local))
    client.log_artifacts(run_id, str(local), "model")
    client.finalize_logged_model(lm.model_id, "READY")
    return lm.model_id


def _requirements() -> list[str]:
    from importlib import metadata

    out = []
    for pkg in ("cl-audit", "mlflow", "torch", "transformers", "peft", "safetensors"):
        try:
            out.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return out
