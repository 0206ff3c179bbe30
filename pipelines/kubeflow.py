"""The audit as a Kubeflow Pipelines (kfp v2) pipeline: the same stages, as components.

Each component is a thin wrapper that runs in the project's image and calls (through
:mod:`pipelines.kubeflow_steps`) the same stage function as the Ray DAG
(:func:`components.runner.prepare`, :func:`~components.runner.train`,
:func:`~components.runner.probe`); the last one calls :func:`pipelines.audit.run_audit`
with the stage results read from its input artifacts, so a pipeline run writes the same
``summary.json``, ``metrics.parquet`` and MLflow records as ``cl-audit run``.

::

    prepare-data ─> data (Dataset), base-model (Model), recovery cells ["in_task/10", ...]
    tune(base-model) ─> aligned (Model) ─> perturb ─> perturbed (Model)
    ParallelFor cell: recover(perturbed, cell) ─> recovered (Model)
    probe(each checkpoint) ─> probe (Artifact: predictions, log-probs), metrics (Metrics)
    verdict(all of them) ─> audit (Artifact: the run folder), metrics (Metrics)

Artifacts (all directories, safetensors/Parquet/JSON, nothing pickled):

- ``Dataset``: ``data.json``, the split of the suite's items (:meth:`SuiteData.to_dict`)
  with the model and data digests.
- ``Model`` (base): ``model/`` (a transformers directory) and ``checkpoint.json``.
- ``Model`` (trained): ``checkpoint.json`` (name, store key, adapter paths relative to
  the artifact), ``adapters/<i>/`` (every LoRA adapter from the base up, in order) or
  ``full/`` (full fine-tuning), and ``stage.json`` (loss history, item count).
- probe ``Artifact``: ``predictions.parquet``, ``probe.json``,
  ``ref_logprobs.safetensors`` and ``stage.json``.

Pipeline parameters: ``config`` (the resolved audit config as a mapping, by default the
one the pipeline was compiled from), ``overrides`` (``section.field=value`` strings, the names
of ``--set``) and ``tracking_uri`` (empty: ``MLFLOW_TRACKING_URI`` of the pod, else a
sqlite store under ``CL_AUDIT_HOME``). The recovery cells come from the run's config;
the CPU and memory requests of the tasks from ``ray.train_cpus`` / ``ray.probe_cpus``
of the compile-time config.

Note: no ``from __future__ import annotations`` here; kfp reads the components'
annotations as types.
"""

from pathlib import Path
from typing import Callable, List

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.config import AuditConfig

PIPELINE_NAME = "cl-audit"
TRAIN_MEMORY = ("4Gi", "8Gi")  # request, limit: SmolLM2-135M LoRA training in fp32
PROBE_MEMORY = ("2Gi", "6Gi")


def default_image() -> str:
    """``cl-audit:<version>``, the tag ``docker build -t`` in infra/README.md gives the image.

    The version is the checkout's (``pyproject.toml`` beside the code, as in the image),
    else the installed package's.
    """
    from importlib import metadata

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.exists():
        import tomllib

        version = tomllib.loads(pyproject.read_text())["project"]["version"]
    else:
        version = metadata.version("cl-audit")
    return f"cl-audit:{version}"


# ---------------------------------------------------------------------------------------
# The components: thin, each runs in the image and calls one step of
# pipelines.kubeflow_steps. Their source is embedded in the pipeline YAML, so everything
# they use is imported inside.


def prepare_data(config: dict, overrides: List[str], data: Output[Dataset],
                 base_model: Output[Model]) -> List[str]:
    """Resolve the model and split the suite's items (facts the base model knows are
    evaluated); returns the recovery cells ``<arm>/<n>`` of the config."""
    from pipelines.kubeflow_steps import prepare_step

    info = prepare_step(config, overrides, data.path, base_model.path)
    data.metadata.update({"n_items": info["n_items"], "n_known": info["n_known"]})
    base_model.metadata.update({"stage": "base", "model_digest": info["model_digest"]})
    return info["cells"]


def tune(config: dict, overrides: List[str], data: Input[Dataset], base_model: Input[Model],
         aligned: Output[Model]):
    """Tune stage: align the base model to the suite's task (LoRA or full)."""
    from pipelines.kubeflow_steps import train_step

    r = train_step("tune", config, overrides, data.path, base_model.path, base_model.path, aligned.path)
    aligned.metadata.update({"stage": r["checkpoint"]["name"], "store_key": r["key"], "n_items": r["n_items"]})


def perturb(config: dict, overrides: List[str], data: Input[Dataset], base_model: Input[Model],
            aligned: Input[Model], perturbed: Output[Model]):
    """Perturb stage: train the aligned model on the perturbation set (KL penalty, frozen layers)."""
    from pipelines.kubeflow_steps import train_step

    r = train_step("perturb", config, overrides, data.path, base_model.path, aligned.path, perturbed.path)
    perturbed.metadata.update({"stage": r["checkpoint"]["name"], "store_key": r["key"], "n_items": r["n_items"]})


def recover(config: dict, overrides: List[str], cell: str, data: Input[Dataset],
            base_model: Input[Model], perturbed: Input[Model], recovered: Output[Model]):
    """Recover stage: train the perturbed model on ``n`` items of one arm (``cell`` = ``<arm>/<n>``)."""
    from pipelines.kubeflow_steps import train_step

    r = train_step("recover", config, overrides, data.path, base_model.path, perturbed.path,
                   recovered.path, cell)
    recovered.metadata.update({"stage": r["checkpoint"]["name"], "store_key": r["key"], "n_items": r["n_items"]})


def probe(config: dict, overrides: List[str], data: Input[Dataset], base_model: Input[Model],
          checkpoint: Input[Model], result: Output[Artifact], metrics: Output[Metrics]):
    """Probe stage: every per-checkpoint metric (task_acc, knowledge_acc, first_token_prob,
    perturb_acc, with bootstrap CIs) and the predictions."""
    from pipelines.kubeflow_steps import probe_step, stage_metrics

    r = probe_step(config, overrides, data.path, base_model.path, checkpoint.path, result.path)
    result.metadata.update({"stage": r["checkpoint"], "store_key": r["key"]})
    for k, v in stage_metrics(r).items():
        metrics.log_metric(k, v)


def verdict(config: dict, overrides: List[str], tracking_uri: str, data: Input[Dataset],
            base_model: Input[Model], aligned: Input[Model], perturbed: Input[Model],
            recovered: Input[List[Model]], base_probe: Input[Artifact], aligned_probe: Input[Artifact],
            perturbed_probe: Input[Artifact], recovered_probes: Input[List[Artifact]],
            audit: Output[Artifact], metrics: Output[Metrics]):
    """Verdict: drift, the spurious-forgetting verdict and the run folder (summary.json,
    metrics.parquet, predictions), recorded in MLflow."""
    from pipelines.kubeflow_steps import verdict_metrics, verdict_step

    trained = [aligned.path, perturbed.path, *[m.path for m in recovered]]
    probed = [base_probe.path, aligned_probe.path, perturbed_probe.path, *[p.path for p in recovered_probes]]
    summary = verdict_step(config, overrides, data.path, base_model.path, trained, probed, audit.path,
                           tracking_uri)
    audit.metadata.update({"verdict": summary["verdict"]["label"], "mlflow_run_id": summary["mlflow"]["run_id"]})
    for k, v in verdict_metrics(summary).items():
        metrics.log_metric(k, v)


def _default_config(cfg: AuditConfig) -> dict:
    """The pipeline's ``config`` default: the resolved config as JSON (kfp: no nulls in a STRUCT)."""
    return cfg.model_dump(mode="json", exclude_none=True)


def build_pipeline(cfg: AuditConfig, image: str | None = None, tracking_uri: str = "") -> Callable:
    """The audit pipeline for ``cfg`` (its defaults), with components in ``image``.

    Returns:
        A kfp pipeline function: compile it with :func:`compile_pipeline`, or call it
        after ``kfp.local.init(...)`` to run it locally.
    """
    image = image or default_image()

    def comp(fn):
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    prepare_c, tune_c, perturb_c, recover_c, probe_c, verdict_c = map(
        comp, (prepare_data, tune, perturb, recover, probe, verdict)
    )
    default_config = _default_config(cfg)
    train_cpu, probe_cpu = str(cfg.ray.train_cpus), str(cfg.ray.probe_cpus)

    def res(task, cpu: str, memory: tuple[str, str]):
        task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory[0]).set_memory_limit(memory[1])
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Spurious-forgetting audit ({cfg.suite}, {cfg.model.id}): tune -> perturb -> "
                    "recover -> probe, then the verdict. Same stages and outputs as `cl-audit run`.",
    )
    def audit_pipeline(config: dict = default_config, overrides: List[str] = [],  # noqa: B006
                       tracking_uri: str = tracking_uri) -> Artifact:
        common = dict(config=config, overrides=overrides)
        prep = res(prepare_c(**common), probe_cpu, PROBE_MEMORY).set_display_name("prepare-data")
        data, base = prep.outputs["data"], prep.outputs["base_model"]
        inputs = dict(common, data=data, base_model=base)

        def probe_of(ckpt, name):
            return res(probe_c(**inputs, checkpoint=ckpt), probe_cpu, PROBE_MEMORY).set_display_name(f"probe-{name}")

        base_probe = probe_of(base, "base")
        aligned = res(tune_c(**inputs), train_cpu, TRAIN_MEMORY).set_display_name("tune")
        aligned_probe = probe_of(aligned.outputs["aligned"], "aligned")
        perturbed = res(perturb_c(**inputs, aligned=aligned.outputs["aligned"]), train_cpu, TRAIN_MEMORY)
        perturbed.set_display_name("perturb")
        perturbed_probe = probe_of(perturbed.outputs["perturbed"], "perturbed")
        with dsl.ParallelFor(prep.outputs["Output"], name="recovery-cells") as cell:
            rec = res(recover_c(**inputs, cell=cell, perturbed=perturbed.outputs["perturbed"]),
                      train_cpu, TRAIN_MEMORY).set_display_name("recover")
            rec_probe = probe_of(rec.outputs["recovered"], "recovered")
        final = verdict_c(
            **inputs, tracking_uri=tracking_uri, aligned=aligned.outputs["aligned"],
            perturbed=perturbed.outputs["perturbed"], recovered=dsl.Collected(rec.outputs["recovered"]),
            base_probe=base_probe.outputs["result"], aligned_probe=aligned_probe.outputs["result"],
            perturbed_probe=perturbed_probe.outputs["result"],
            recovered_probes=dsl.Collected(rec_probe.outputs["result"]),
        )
        res(final, probe_cpu, PROBE_MEMORY).set_display_name("verdict")
        return final.outputs["audit"]

    return audit_pipeline


def pipeline_yaml(cfg: AuditConfig, image: str | None = None, tracking_uri: str = "") -> str:
    """The kfp v2 pipeline YAML of the audit pipeline for ``cfg`` (see :func:`build_pipeline`).

    Deterministic: the same arguments give the same bytes in every process. kfp passes
    the ``config`` default through a protobuf Struct, which turns every number into a
    float (``epochs: 3.0``) and prints the header's copy in the Struct's map order (which
    differs between processes); both are written here from the config itself, integers
    as integers, the header in the config's field order, the body with sorted keys as kfp does.
    """
    import tempfile

    import yaml
    from kfp.compiler.pipeline_spec_builder import extract_comments_from_pipeline_spec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(cfg, image, tracking_uri), str(path))
        docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"] = _default_config(cfg)
    header = extract_comments_from_pipeline_spec(spec, spec["pipelineInfo"].get("description"))
    return header + yaml.dump_all(docs, sort_keys=True)


def compile_pipeline(cfg: AuditConfig, out: Path, image: str | None = None, tracking_uri: str = "") -> Path:
    """Compile the audit pipeline for ``cfg`` to a kfp v2 pipeline YAML at ``out``
    (:func:`pipeline_yaml`, written to a temporary name and renamed).

    Raises:
        UserError: ``out`` cannot be written.
    """
    from components.artifacts import atomic_write
    from components.errors import UserError

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    text = pipeline_yaml(cfg, image, tracking_uri)
    try:
        atomic_write(out, text)
    except OSError as e:
        raise UserError(f"--out {out}: not writable ({e.strerror})") from None
    return out
